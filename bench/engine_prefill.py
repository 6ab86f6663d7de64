"""The reference engine's prefill of a 2048-token prompt, cold and on a kvbus hit, and clear -> recompute.

Every request is a real `/v1/completions` over HTTP with `max_tokens: 1`, so its latency is the
prefill plus one sampled token (time to first token). "Cold" prompts are fresh random token
ids; a "hit" repeats the previous prompt, so the engine's agent supplies all but the last token
from its LocalCPUBackend. Each answer's `cached_tokens` is checked, so a figure can not come from
the wrong path.

Clear -> recompute: after a hit, `/clear` goes through the controller and the agent; the clock
starts when the clear's answer arrives and stops when the next request for the same prompt has
returned, which must report `cached_tokens: 0` (the clear was visible at once) and has paid a
full prefill again.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import torch

from bench._harness import (
    VOCAB,
    Figure,
    controller,
    engine,
    main,
    ms,
    note,
    percentile,
    redis_server,
    workdir,
)
from kvbus.shared.locations import Location

INSTANCE = "bench-engine"
PROMPT_TOKENS = 2048


def _complete(client: httpx.Client, base: str, prompt: list[int]) -> tuple[float, int]:
    started = time.perf_counter()
    response = client.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0})
    elapsed = time.perf_counter() - started
    body: dict[str, Any] = response.json()
    if response.status_code != 200:
        raise RuntimeError(f"completion failed: {response.status_code} {body}")
    return elapsed, int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def _expect(cached: int, wanted: int, what: str) -> None:
    if cached != wanted:
        raise RuntimeError(f"{what}: cached_tokens {cached}, expected {wanted}")


def run(quick: bool) -> list[Figure]:
    rounds = 3 if quick else 10
    rng = torch.Generator().manual_seed(2048)
    cold: list[float] = []
    warm: list[float] = []
    after_clear: list[float] = []
    with (
        workdir() as scratch,
        redis_server(scratch) as server,
        controller(server.url, scratch) as ctl,
        engine(server.url, INSTANCE, scratch) as eng,
        httpx.Client(timeout=60) as client,
    ):
        note(f"{rounds} rounds of cold / hit / clear -> recompute on a {PROMPT_TOKENS}-token prompt")
        _complete(client, eng.url, torch.randint(0, VOCAB, (PROMPT_TOKENS,), generator=rng).tolist())  # warm-up
        for _ in range(rounds):
            prompt = torch.randint(0, VOCAB, (PROMPT_TOKENS,), generator=rng).tolist()
            elapsed, cached = _complete(client, eng.url, prompt)
            _expect(cached, 0, "cold prompt")
            cold.append(elapsed)
            elapsed, cached = _complete(client, eng.url, prompt)
            _expect(cached, PROMPT_TOKENS - 1, "repeated prompt")
            warm.append(elapsed)
            response = client.post(f"{ctl.url}/clear", json={"instance_id": INSTANCE, "location": str(Location.CPU)})
            if response.status_code != 200 or response.json()["num_tokens"] < PROMPT_TOKENS:
                raise RuntimeError(f"clear failed: {response.status_code} {response.text}")
            cleared_at = time.perf_counter()
            _, cached = _complete(client, eng.url, prompt)
            after_clear.append(time.perf_counter() - cleared_at)
            _expect(cached, 0, "prompt right after its clear")
    speedup = percentile(cold, 50) / percentile(warm, 50)
    conditions = f"reference engine (35 M params, fp32, CPU), {PROMPT_TOKENS} tokens, max_tokens 1, {rounds} rounds"
    return [
        Figure(
            "engine prefill, cold",
            conditions,
            f"p50 {ms(percentile(cold, 50))}, p99 {ms(percentile(cold, 99))}",
            data={"p50_s": percentile(cold, 50), "p99_s": percentile(cold, 99)},
        ),
        Figure(
            "engine prefill, kvbus hit (2047 of 2048 reused)",
            conditions,
            f"p50 {ms(percentile(warm, 50))}, p99 {ms(percentile(warm, 99))}; {speedup:.1f}x faster",
            data={"p50_s": percentile(warm, 50), "p99_s": percentile(warm, 99), "speedup": speedup},
        ),
        Figure(
            "/clear answer -> next request recomputed",
            conditions + "; cached_tokens 0 checked",
            f"p50 {ms(percentile(after_clear, 50))}, p99 {ms(percentile(after_clear, 99))}",
            data={"p50_s": percentile(after_clear, 50), "p99_s": percentile(after_clear, 99)},
        ),
    ]


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
