"""One completion at a time against an agent's memory tier: reuse counts, sampling, stop strings, streamed text."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
import quicktok
import torch

from kvbus.agent.agent import Agent
from kvbus.engine import protocol
from kvbus.engine.generator import MIN_TEMPERATURE, Completion, Generator, SamplingParams
from kvbus.engine.model import TinyLlama
from kvbus.shared.config import KVBusConfig
from tests.conftest import MODEL, SEED_TOKENS
from tests.engine.conftest import LONG

# Greedy and short unless a test says otherwise: greedy text is the same on every run.
QUICK = SamplingParams(max_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def encoding() -> quicktok.Encoding:
    return quicktok.get_encoding("llama3")


@pytest.fixture
def generator(model: TinyLlama, encoding: quicktok.Encoding) -> Generator:
    # The agent is never started, so it never reaches Redis: the generator only stores into and retrieves
    # from its memory tier, and a fresh agent per test means every test starts with nothing cached.
    agent = Agent(KVBusConfig(redis_url="redis://127.0.0.1:1/0"), model=MODEL)
    return Generator(model, agent, encoding)


def complete(generator: Generator, prompt: Sequence[int], **changes: Any) -> Completion:
    return generator.complete(prompt, replace(QUICK, **changes))


def test_a_repeat_reuses_all_but_the_last_token_and_gives_the_same_tokens(generator: Generator) -> None:
    cold = complete(generator, LONG, logprobs=3)
    assert (cold.prompt_tokens, cold.cached_tokens) == (600, 0)
    assert generator.agent.tiers.contains(LONG) == 600
    warm = complete(generator, LONG, logprobs=3)
    # The last prompt token is always computed: the first generated token's logits come from it.
    assert (warm.prompt_tokens, warm.cached_tokens) == (600, 599)
    assert warm.token_ids == cold.token_ids and warm.text == cold.text
    assert warm.token_logprobs == pytest.approx(cold.token_logprobs, abs=1e-4)


def test_a_prompt_shorter_than_a_chunk_is_reused_too(generator: Generator) -> None:
    complete(generator, SEED_TOKENS)
    assert complete(generator, SEED_TOKENS).cached_tokens == 11


def test_a_longer_prompt_reuses_the_shared_full_chunks(generator: Generator) -> None:
    complete(generator, LONG)
    longer = complete(generator, [*LONG[:512], *range(7000, 7100)])
    assert longer.cached_tokens == 512


def test_a_prompt_that_differs_in_its_first_chunk_reuses_nothing(generator: Generator) -> None:
    complete(generator, LONG)
    # Chunk keys chain from position 0, so a change in the first chunk changes every key after it.
    assert complete(generator, [9999, *LONG[1:]]).cached_tokens == 0


def test_a_prompt_the_agent_cannot_keep_is_still_served(
    generator: Generator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(tokens: Sequence[int], kv: Sequence[torch.Tensor]) -> int:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(generator.agent.tiers, "store", refuse)
    with caplog.at_level(logging.WARNING, logger="kvbus.engine"):
        served = complete(generator, SEED_TOKENS)
    assert served.cached_tokens == 0 and len(served.token_ids) == 4
    assert "served but not cached" in caplog.text and "out of memory" in caplog.text
    assert complete(generator, SEED_TOKENS).cached_tokens == 0  # nothing was kept to reuse
    monkeypatch.undo()
    assert complete(generator, SEED_TOKENS).token_ids == served.token_ids


def test_max_tokens_bounds_the_tokens_generated(generator: Generator) -> None:
    result = complete(generator, SEED_TOKENS, max_tokens=5)
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    assert result.text == generator.encoding.decode(result.token_ids)


def test_sampling_with_a_seed_repeats_and_another_seed_differs(generator: Generator) -> None:
    first = complete(generator, SEED_TOKENS, temperature=1.0, seed=7, max_tokens=8)
    again = complete(generator, SEED_TOKENS, temperature=1.0, seed=7, max_tokens=8)
    other = complete(generator, SEED_TOKENS, temperature=1.0, seed=8, max_tokens=8)
    assert first.text == again.text and first.token_ids == again.token_ids
    assert other.token_ids != first.token_ids


@pytest.mark.parametrize("seed", [protocol.SEED_MIN, -1, protocol.SEED_MAX])
def test_every_seed_the_protocol_accepts_seeds_the_sampler(generator: Generator, seed: int) -> None:
    first = complete(generator, SEED_TOKENS, temperature=1.0, seed=seed, max_tokens=4)
    assert complete(generator, SEED_TOKENS, temperature=1.0, seed=seed, max_tokens=4).token_ids == first.token_ids


@pytest.mark.parametrize("temperature", [1e-300, 1e-6])
def test_a_temperature_too_small_to_divide_by_samples_as_vllms_minimum_does(
    generator: Generator, temperature: float
) -> None:
    tiny = complete(generator, SEED_TOKENS, temperature=temperature, seed=5, max_tokens=4)
    assert (
        tiny.token_ids == complete(generator, SEED_TOKENS, temperature=MIN_TEMPERATURE, seed=5, max_tokens=4).token_ids
    )


def test_temperature_zero_and_a_tiny_top_p_both_pick_the_most_likely_token(generator: Generator) -> None:
    greedy = complete(generator, SEED_TOKENS, max_tokens=8).token_ids
    assert complete(generator, SEED_TOKENS, max_tokens=8, seed=3).token_ids == greedy
    # The nucleus always keeps the most likely token, so a tiny top_p leaves nothing else to sample.
    for seed, top_p in ((1, 1e-6), (2, 1e-6), (1, 1e-320)):  # 1e-320 is 0 in float32, and still keeps one
        nucleus = complete(generator, SEED_TOKENS, max_tokens=8, temperature=1.0, top_p=top_p, seed=seed)
        assert nucleus.token_ids == greedy


def test_stop_strings_cut_the_text_before_the_earliest_one(generator: Generator) -> None:
    greedy = complete(generator, SEED_TOKENS, max_tokens=8).text
    cut = complete(generator, SEED_TOKENS, max_tokens=8, stop=(greedy[3:6],))
    assert cut.finish_reason == "stop"
    assert cut.text == greedy[: greedy.index(greedy[3:6])]
    both = complete(generator, SEED_TOKENS, max_tokens=8, stop=(greedy[9:12], greedy[3:6]))
    assert both.text == cut.text
    absent = complete(generator, SEED_TOKENS, max_tokens=8, stop=("never in this text",))
    assert absent.text == greedy and absent.finish_reason == "length"


def stream(generator: Generator, stop: tuple[str, ...]) -> tuple[Completion, list[str]]:
    pieces: list[str] = []
    result = generator.complete(SEED_TOKENS, SamplingParams(max_tokens=12, temperature=0, stop=stop), pieces.append)
    assert "".join(pieces) == result.text
    # Sent text is final: no piece is taken back later, even one that could have begun a stop string.
    assert all(result.text.startswith("".join(pieces[:i])) for i in range(1, len(pieces) + 1))
    return result, pieces


@pytest.mark.parametrize("stop", [(), ("STOP-NOT-HERE",)])
def test_streamed_pieces_add_up_to_the_whole_text(generator: Generator, stop: tuple[str, ...]) -> None:
    greedy = complete(generator, SEED_TOKENS, max_tokens=12).text
    result, pieces = stream(generator, stop)
    assert result.text == greedy and len(pieces) > 1


def test_streaming_holds_back_text_that_could_begin_a_stop_string(generator: Generator) -> None:
    greedy = complete(generator, SEED_TOKENS, max_tokens=12).text
    stop = greedy[5:9]
    result, pieces = stream(generator, (stop,))
    assert result.text == greedy[: greedy.index(stop)] and result.finish_reason == "stop"
    assert stop not in "".join(pieces)


def test_logprobs_report_the_chosen_token_among_the_top_ones(generator: Generator) -> None:
    result = complete(generator, SEED_TOKENS, logprobs=3)
    assert len(result.token_logprobs) == len(result.token_texts) == len(result.top_logprobs) == 4
    for token, text, logprob, top in zip(
        result.token_ids, result.token_texts, result.token_logprobs, result.top_logprobs, strict=True
    ):
        assert text == generator.token_text(token)
        assert len(top) == 3 and top[text] == pytest.approx(logprob)
        assert logprob == pytest.approx(max(top.values())) and logprob <= 0  # greedy picks the most likely


def test_logprobs_zero_reports_only_the_chosen_token_and_none_asked_reports_nothing(generator: Generator) -> None:
    chosen = complete(generator, SEED_TOKENS, logprobs=0)
    assert [list(top) for top in chosen.top_logprobs] == [[t] for t in chosen.token_texts]
    plain = complete(generator, SEED_TOKENS)
    assert (plain.token_texts, plain.token_logprobs, plain.top_logprobs) == ([], [], [])
