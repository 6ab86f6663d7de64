"""Real vLLM (CPU build, tiny random-weight Llama-3-shaped model) with the kvbus connector: the prefill
of a 2048-token prompt cold and on a kvbus hit, and how soon after a `/clear` answers the next
request has recomputed.

Time to first token is the wall time of a completion with max_tokens=1, over loopback HTTP. Prefix
caching is off, so a hit comes from kvbus only: 1920 of the 2048 tokens load (whole 128-token
blocks, the last token always computed) and 128 are computed; a cold 128-token prompt shows what
the request costs beyond loading. Each cold sample is a fresh random
prompt; each hit repeats the prompt of the cold sample before it. "clear -> recompute" runs from
the controller's /clear answer to the next request's answer, which must report 0 cached tokens.

Needs .venv-vllm (`bash scripts/install-vllm`); without it the benchmark reports why and skips.
Starting vLLM takes 50-100 s of the run.
"""

from __future__ import annotations

import random
import statistics
import time

import httpx

from bench._harness import Figure, controller, main, ms, note, percentile, redis_server, workdir
from tests.vllm.server import build_model, unavailable, vllm_server

PROMPT_TOKENS = 2048
COMPUTED_ON_HIT = 128
INSTANCE = "lmcache_default_instance"
CPU = "LocalCPUBackend"


def _prompt(rng: random.Random, length: int = PROMPT_TOKENS) -> list[int]:
    return [128000, *(rng.randrange(1000, 100_000) for _ in range(length - 1))]


def _summary(samples: list[float]) -> str:
    return f"p50 {ms(statistics.median(samples))}, p90 {ms(percentile(samples, 90))}"


def run(quick: bool) -> list[Figure]:
    reason = unavailable()
    if reason is not None:
        return [Figure("vLLM prefill", "skipped", reason)]
    samples = 3 if quick else 10
    rng = random.Random(0)
    cold: list[float] = []
    short: list[float] = []
    hit: list[float] = []
    recompute: list[float] = []
    with workdir() as tmp, redis_server(tmp) as server, controller(server.url, tmp) as ctl:
        note("vllm_prefill: building the tiny model and starting vLLM (50-100 s)")
        port = 18_000 + rng.randrange(1000)
        with (
            vllm_server(build_model(tmp / "model"), server.url, port, tmp / "vllm.log") as vllm,
            httpx.Client(timeout=120) as http,
        ):

            def ttft(tokens: list[int]) -> tuple[float, int]:
                started = time.perf_counter()
                answer = vllm.complete(tokens)
                return time.perf_counter() - started, answer["usage"]["prompt_tokens_details"]["cached_tokens"]

            def clear() -> None:
                response = http.post(f"{ctl.url}/clear", json={"instance_id": INSTANCE, "location": CPU})
                response.raise_for_status()

            note(f"vllm_prefill: up in {vllm.started_in_s:.0f} s; warming up")
            for _ in range(3):  # the first requests after start pay one-off costs
                warm = _prompt(rng)
                ttft(warm)
                ttft(warm)
            for _ in range(samples):
                tokens = _prompt(rng)
                seconds, cached = ttft(tokens)
                if cached:
                    raise RuntimeError(f"a fresh prompt reported {cached} cached tokens")
                cold.append(seconds)
                short.append(ttft(_prompt(rng, COMPUTED_ON_HIT))[0])
                seconds, cached = ttft(tokens)
                if cached != 1920:
                    raise RuntimeError(f"a repeated prompt reported {cached} cached tokens, not 1920")
                hit.append(seconds)
                clear()
                started = time.perf_counter()
                _, cached = ttft(tokens)
                recompute.append(time.perf_counter() - started)
                if cached:
                    raise RuntimeError(f"the request after a clear reported {cached} cached tokens")
    speedup = statistics.median(cold) / statistics.median(hit)
    return [
        Figure(
            f"vLLM prefill {PROMPT_TOKENS} tokens, cold",
            f"tiny model, bf16, 2 CPU threads; {samples} prompts",
            _summary(cold),
            data={"p50_s": statistics.median(cold)},
        ),
        Figure(
            f"vLLM prefill {PROMPT_TOKENS} tokens, kvbus hit",
            f"1920 tokens loaded, 128 computed; {samples}",
            f"{_summary(hit)}; {speedup:.1f}x faster",
            data={"p50_s": statistics.median(hit), "speedup": speedup},
        ),
        Figure(
            f"  vLLM prefill {COMPUTED_ON_HIT} tokens, cold",
            "what a hit computes, with no context to attend to",
            _summary(short),
            data={"p50_s": statistics.median(short)},
        ),
        Figure(
            "/clear answered -> recompute done",
            f"next request for the cleared prompt; {samples}",
            _summary(recompute),
            data={"p50_s": statistics.median(recompute)},
        ),
    ]


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
