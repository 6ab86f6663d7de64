"""The scheduler side's decisions: hit counts and each step's loads and saves, with plain lists."""

from __future__ import annotations

import pytest

from kvbus.agent.connector_plan import LoadSpec, SaveSpec, StepPlanner, loadable_tokens
from kvbus.shared.hashing import HashSpace

SPACE = HashSpace("test/model", chunk_size=8)
BLOCK = 4


class Index:
    """A fake index: the chunk keys it holds, and how often it was asked."""

    def __init__(self, *prompts: list[int]) -> None:
        self.keys = {c.key for p in prompts for c in SPACE.chunks(p)}
        self.asked = 0

    def held(self, keys: list[str]) -> int:
        self.asked += 1
        count = 0
        for key in keys:
            if key not in self.keys:
                break
            count += 1
        return count


@pytest.mark.parametrize(
    ("held_end", "prompt_len", "computed", "expected"),
    [
        (0, 20, 0, 0),
        (16, 20, 0, 16),  # two whole chunks
        (20, 20, 0, 16),  # a full hit still leaves a token to compute, and whole blocks only
        (16, 16, 0, 12),  # ... even when the prompt ends on a block boundary
        (12, 12, 0, 8),  # a partial chunk gives its full blocks
        (16, 20, 8, 8),  # the engine's own cache already covers two blocks
        (16, 20, 16, 0),
        (8, 20, 12, 0),  # never negative
        (3, 12, 0, 0),  # less than a block
    ],
)
def test_loadable_tokens_are_whole_blocks_and_leave_one_token(
    held_end: int, prompt_len: int, computed: int, expected: int
) -> None:
    assert loadable_tokens(held_end, prompt_len, computed, BLOCK) == expected


def test_chunks_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple"):
        StepPlanner(SPACE, 3)


def test_matched_counts_the_contiguous_prefix_and_asks_the_index_once() -> None:
    prompt = list(range(30))
    index = Index(prompt[:16])  # chunks 0 and 1
    planner = StepPlanner(SPACE, BLOCK)
    assert planner.matched_tokens("r", prompt, 0, index.held) == 16
    assert planner.matched_tokens("r", prompt, 0, index.held) == 16
    assert index.asked == 1
    index.keys.clear()  # a clear between two calls for one request does not change the answer
    assert planner.matched_tokens("r", prompt, 0, index.held) == 16


def test_a_hole_stops_the_prefix() -> None:
    prompt = list(range(30))
    index = Index(prompt)
    index.keys.discard(SPACE.chunks(prompt)[1].key)
    assert StepPlanner(SPACE, BLOCK).matched_tokens("r", prompt, 0, index.held) == 8


def test_a_prompt_of_another_start_misses() -> None:
    index = Index(list(range(30)))
    assert StepPlanner(SPACE, BLOCK).matched_tokens("r", [99, *range(1, 30)], 0, index.held) == 0


def test_allocation_plans_a_load_of_the_hit_blocks() -> None:
    prompt = list(range(30))
    planner = StepPlanner(SPACE, BLOCK)
    hits = planner.matched_tokens("r", prompt, 0, Index(prompt).held)
    assert hits == 28  # 24 of full chunks + one whole block of the trailing 6-token chunk
    planner.allocated("r", prompt, list(range(100, 108)), hits)
    (load,) = planner.take_plan().loads
    assert load == LoadSpec("r", prompt, 0, list(range(100, 107)))
    assert planner.take_plan().loads == []


def test_a_load_after_the_engines_own_hit_starts_at_its_end_and_reads_only_the_chunks_it_needs() -> None:
    prompt = list(range(30))
    planner = StepPlanner(SPACE, BLOCK)
    hits = planner.matched_tokens("r", prompt, 4, Index(prompt[:16]).held)
    assert hits == 12
    planner.allocated("r", prompt, [7, 8, 9, 10, 11, 12, 13, 14], hits)
    (load,) = planner.take_plan().loads
    assert load == LoadSpec("r", prompt[:16], 1, [8, 9, 10])


def test_no_load_when_the_engine_takes_nothing() -> None:
    prompt = list(range(30))
    planner = StepPlanner(SPACE, BLOCK)
    planner.matched_tokens("r", prompt, 0, Index(prompt).held)
    planner.allocated("r", prompt, list(range(8)), 0)
    assert planner.take_plan().loads == []


def test_the_step_that_computes_the_prompts_last_token_saves_it() -> None:
    prompt = list(range(10))
    planner = StepPlanner(SPACE, BLOCK)
    planner.scheduled("r", prompt, [5, 6, 7], 0, 10, replace_blocks=True)
    assert planner.take_plan().saves == [SaveSpec("r", prompt, [5, 6, 7])]
    planner.scheduled("r", None, [8], 10, 1, replace_blocks=False)  # decode: nothing to save
    assert planner.take_plan().saves == []


def test_a_chunked_prefill_saves_once_its_last_chunk_is_computed() -> None:
    prompt = list(range(10))
    planner = StepPlanner(SPACE, BLOCK)
    planner.scheduled("r", prompt, [5, 6], 0, 8, replace_blocks=True)
    assert planner.take_plan().saves == []
    planner.scheduled("r", None, [9], 8, 2, replace_blocks=False)
    assert planner.take_plan().saves == [SaveSpec("r", prompt, [5, 6, 9])]


def test_a_recompute_after_a_failed_load_saves_again_and_a_resumed_request_uses_its_new_blocks() -> None:
    prompt = list(range(10))
    planner = StepPlanner(SPACE, BLOCK)
    planner.scheduled("r", prompt, [5, 6, 7], 8, 2, replace_blocks=True)
    planner.take_plan()
    planner.scheduled("r", None, [], 4, 6, replace_blocks=False)  # the engine cut num_computed back to 4
    assert planner.take_plan().saves == [SaveSpec("r", prompt, [5, 6, 7])]
    planner.scheduled("r", None, [1, 2, 3, 4], 0, 10, replace_blocks=True)  # preempted, then resumed
    assert planner.take_plan().saves == [SaveSpec("r", prompt, [1, 2, 3])]


def test_finished_requests_are_forgotten() -> None:
    prompt = list(range(10))
    planner = StepPlanner(SPACE, BLOCK)
    planner.matched_tokens("r", prompt, 0, Index(prompt).held)
    planner.scheduled("r", prompt, [1, 2], 0, 4, replace_blocks=True)
    planner.finished("r")
    planner.scheduled("r", None, [3], 4, 6, replace_blocks=False)
    assert planner.take_plan().saves == []
