"""The scheduler side of an engine connector: how many prompt tokens the agent can supply, and
each engine step's plan of blocks to fill from the agent (loads) and prompts to keep (saves).

It runs where the engine schedules (vLLM's EngineCore process), which holds no KV: hits come from
the Redis index, through a `held` callable. Nothing here imports an engine, so every decision is
tested with plain lists; `vllm_connector.py` only translates vLLM's objects into these calls.

Chunks are `chunk_size` tokens and the engine's paged blocks `block_size` tokens, with chunk_size
a multiple of block_size, so that a chunk is always a run of whole blocks: the interior layout of
a block belongs to the attention backend, and the agent never looks inside one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvbus.shared.hashing import HashSpace


@dataclass(frozen=True)
class LoadSpec:
    """Fill blocks of one request from the agent's chunks, before the step's forward."""

    req_id: str
    tokens: Sequence[int]  # the prompt up to the end of the last chunk read: what those chunks' keys hash
    first_block: int  # position in the request of the first block to fill
    block_ids: Sequence[int]  # the blocks to fill, from first_block on


@dataclass(frozen=True)
class SaveSpec:
    """Keep one prompt's KV, whose last token this step computes."""

    req_id: str
    tokens: Sequence[int]  # the whole prompt
    block_ids: Sequence[int]  # the blocks holding it, in order


@dataclass
class StepPlan:
    """What the worker side does in one engine step; picklable, as the engine ships it between processes."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Request:
    prompt: Sequence[int]
    block_ids: list[int]


def loadable_tokens(held_end: int, prompt_len: int, num_computed: int, block_size: int) -> int:
    """Tokens past `num_computed` that can come from `held_end` held tokens.

    Whole blocks only, and never the prompt's last token: the engine must compute at least one
    token to sample the next from.
    """
    usable = min(held_end, prompt_len - 1)
    usable -= usable % block_size
    return max(usable - num_computed, 0)


class StepPlanner:
    """Per-request state of the scheduler side, from the first lookup to the request's end."""

    def __init__(self, space: HashSpace, block_size: int) -> None:
        if block_size < 1 or space.chunk_size % block_size:
            raise ValueError(
                f"chunk_size {space.chunk_size} must be a multiple of the engine's block size "
                f"{block_size}, so that chunks are whole blocks"
            )
        self.space = space
        self.block_size = block_size
        # req_id -> (tokens held from 0, tokens the engine had computed): the engine may ask
        # about one request many times before it is scheduled, and must get the same answer.
        self._matched: dict[str, tuple[int, int]] = {}
        self._requests: dict[str, _Request] = {}
        self._plan = StepPlan()

    def matched_tokens(
        self, req_id: str, prompt: Sequence[int], num_computed: int, held: Callable[[list[str]], int]
    ) -> int:
        """How many tokens past `num_computed` the agent can fill. `held(keys)` says how many of the
        prompt's chunk keys, from the first, the agent holds; it is asked once per request."""
        if req_id not in self._matched:
            chunks = self.space.chunks(prompt)
            count = held([c.key for c in chunks]) if chunks else 0
            self._matched[req_id] = (chunks[count - 1].end if count else 0, num_computed)
        held_end, _ = self._matched[req_id]
        return loadable_tokens(held_end, len(prompt), num_computed, self.block_size)

    def allocated(self, req_id: str, prompt: Sequence[int], block_ids: Sequence[int], num_external: int) -> None:
        """The engine gave the request its blocks and will take `num_external` tokens from the agent."""
        held_end, num_computed = self._matched.pop(req_id, (0, 0))
        if num_external <= 0:
            return
        if num_computed % self.block_size or num_external % self.block_size or num_computed + num_external > held_end:
            raise ValueError(
                f"request {req_id}: the engine takes {num_external} tokens from {num_computed}, "
                f"which is not what this planner offered (whole blocks up to {held_end})"
            )
        first = num_computed // self.block_size
        end = (num_computed + num_external) // self.block_size
        last_chunk = (end * self.block_size - 1) // self.space.chunk_size
        tokens_end = min((last_chunk + 1) * self.space.chunk_size, len(prompt))
        self._plan.loads.append(LoadSpec(req_id, prompt[:tokens_end], first, list(block_ids[first:end])))

    def scheduled(
        self,
        req_id: str,
        prompt: Sequence[int] | None,
        new_block_ids: Sequence[int],
        num_computed: int,
        num_scheduled: int,
        *,
        replace_blocks: bool,
    ) -> None:
        """The step computes `num_scheduled` tokens of the request from `num_computed` on.

        `prompt` is given for a request new to the engine. `new_block_ids` extend the request's
        blocks, or are all of them when `replace_blocks` (a new or resumed request). The step that
        computes the prompt's last token saves the prompt; so does a later step that recomputes it,
        as happens after a failed load.
        """
        request = self._requests.get(req_id)
        if prompt is not None:
            request = self._requests[req_id] = _Request(prompt, [])
        if request is None:
            return  # a request the engine could not give us tokens for
        if replace_blocks:
            request.block_ids = list(new_block_ids)
        else:
            request.block_ids.extend(new_block_ids)
        prompt_len = len(request.prompt)
        if prompt_len and num_computed < prompt_len <= num_computed + num_scheduled:
            blocks = -(-prompt_len // self.block_size)
            self._plan.saves.append(SaveSpec(req_id, request.prompt, request.block_ids[:blocks]))

    def finished(self, req_id: str) -> None:
        self._matched.pop(req_id, None)
        self._requests.pop(req_id, None)

    def take_plan(self) -> StepPlan:
        """This step's plan; the next step starts a fresh one."""
        plan, self._plan = self._plan, StepPlan()
        return plan
