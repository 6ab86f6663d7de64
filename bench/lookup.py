"""`/lookup` latency over HTTP with 10, 100 and 1000 registered instances of 1000 chunks each.

Lookup must cost the same however large the fleet: the prompt's first chunk names, through its
head set, the few instances worth reading, and only those are read. Three instances hold the
looked-up 8192-token prompt (two all of it, one its first half); every other chunk in the fleet
belongs to unrelated prompts. The layout size is printed to show each lookup really hits.

Requests go one after another over one keep-alive httpx client to a real controller process.
The fleet's index is written in-process (a Registration and an IndexWriter per instance), and
each instance's heartbeat key is set to last an hour since no agent refreshes it.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import redis
import torch

from bench._harness import (CHUNK_SIZE, Figure, cpu_seconds, controller, entries, ingest, main, ms, note,
                            percentile, random_prompt, redis_server, register, unrelated_entries, workdir)
from kvbus.agent.backends.base import IndexEntry
from kvbus.controller.lookup import PrefixIndex
from kvbus.shared import keys, redis_conn

INSTANCE_COUNTS = (10, 100, 1000)
CHUNKS_PER_INSTANCE = 1000
HOLDERS = {0: 32, 1: 32, 2: 16}  # instance number -> how many chunks of the looked-up prompt it holds
TARGET_P50_S = 0.002
FLAT_RATIO = 1.5  # p50 at the largest fleet over p50 at the smallest that still counts as flat


def _instance(number: int) -> str:
    return f"bench-{number:04d}"


def _populate(client: redis.Redis, rng: torch.Generator, numbers: range, prompt: list[IndexEntry]) -> None:
    for number in numbers:
        instance_id = _instance(number)
        held = prompt[: HOLDERS.get(number, 0)]
        register(client, instance_id)
        client.set(keys.alive(instance_id), 0, ex=3600)  # no heartbeat thread runs for these instances
        ingest(client, instance_id, held + unrelated_entries(rng, CHUNKS_PER_INSTANCE - len(held)))


def _in_process(redis_url: str, tokens: list[int], samples: int) -> list[float]:
    """PrefixIndex.lookup called directly: the index work without HTTP, JSON or uvicorn."""
    async def measure() -> list[float]:
        client = redis_conn.connect_async(redis_url)
        index = PrefixIndex(client)
        latencies = []
        try:
            for _ in range(samples):
                started = time.perf_counter()
                await index.lookup(tokens)
                latencies.append(time.perf_counter() - started)
        finally:
            await client.aclose()
        return latencies
    return asyncio.run(measure())


def run(quick: bool) -> list[Figure]:
    samples, warmup = (200, 30) if quick else (1000, 100)
    rng = torch.Generator().manual_seed(1)
    tokens = random_prompt(rng).tolist()
    body = json.dumps({"tokens": tokens}).encode()
    expected = {_instance(n): chunks * CHUNK_SIZE for n, chunks in HOLDERS.items()}
    prompt = entries(tokens)
    figures: list[Figure] = []
    p50s: dict[int, float] = {}
    with workdir() as tmp, redis_server(tmp) as server, controller(server.url, tmp) as ctl:
        client = redis_conn.connect(server.url)
        http = httpx.Client(base_url=ctl.url, headers={"content-type": "application/json"}, timeout=10)
        try:
            populated = 0
            for count in INSTANCE_COUNTS:
                started = time.perf_counter()
                _populate(client, rng, range(populated, count), prompt)
                note(f"lookup: fleet now {count} instances x {CHUNKS_PER_INSTANCE} chunks "
                     f"(+{(count - populated) * CHUNKS_PER_INSTANCE} chunks in {time.perf_counter() - started:.1f} s)")
                populated = count
                layout = http.post("/lookup", content=body).raise_for_status().json()["layout_info"]
                hit = {instance: held for instance, (_, held) in layout.items()} == expected
                for _ in range(warmup):
                    http.post("/lookup", content=body).raise_for_status()
                latencies = []
                cpu_before = cpu_seconds(ctl.pid)
                for _ in range(samples):
                    started = time.perf_counter()
                    response = http.post("/lookup", content=body)
                    latencies.append(time.perf_counter() - started)
                    response.raise_for_status()
                ctl_cpu = (cpu_seconds(ctl.pid) - cpu_before) / samples
                p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                p50s[count] = p50
                figures.append(Figure(
                    "/lookup p50/p99 (HTTP)",
                    f"{count} inst x {CHUNKS_PER_INSTANCE} chunks, 8192 tok; layout {len(layout)} inst"
                    f"{'' if hit else ' (WRONG)'}, {samples} seq",
                    f"{ms(p50)} / {ms(p99)}  (ctl CPU {ms(ctl_cpu)}/req)",
                    "p50 <= 2 ms (LMCache 0.5.6: 75 ms @1000)",
                    hit and p50 <= TARGET_P50_S,
                    {"instances": count, "p50_s": p50, "p99_s": p99, "controller_cpu_s_per_req": ctl_cpu,
                     "layout_size": len(layout), "layout_correct": float(hit)},
                ))
            direct = _in_process(server.url, tokens, samples)
            figures.append(Figure(
                "PrefixIndex.lookup p50/p99", f"in-process, no HTTP; {INSTANCE_COUNTS[-1]} instances",
                f"{ms(percentile(direct, 50))} / {ms(percentile(direct, 99))}",
                data={"p50_s": percentile(direct, 50), "p99_s": percentile(direct, 99)},
            ))
        finally:
            http.close()
            client.close()
    ratio = p50s[INSTANCE_COUNTS[-1]] / p50s[INSTANCE_COUNTS[0]]
    figures.append(Figure(
        "/lookup flatness", f"p50 at {INSTANCE_COUNTS[-1]} / p50 at {INSTANCE_COUNTS[0]} instances",
        f"{ratio:.2f}x", f"flat (<= {FLAT_RATIO}x)", ratio <= FLAT_RATIO, {"ratio": ratio},
    ))
    return figures


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
