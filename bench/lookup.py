"""`/lookup` latency over HTTP with 10, 100 and 1000 registered instances of 1000 chunks each.

Lookup must cost the same however large the fleet: the prompt's first chunk names, through its
head set, the few instances worth reading, and only those are read. Three instances hold the
looked-up 8192-token prompt (two all of it, one its first half); every other chunk in the fleet
belongs to unrelated prompts.

Requests go one after another over one keep-alive connection (bench/_http.py, a raw HTTP/1.1
client far cheaper than httpx) to a real controller process, and every answer must be a 200
whose layout names exactly the instances that hold the prompt, with what they hold. The fleet's
index is written in-process (a Registration and an IndexWriter per instance, each instance's
chunks published in one replacement as an agent does on start), and each instance's heartbeat
key is set to last an hour since no agent refreshes it.

The last row is a worst case with no target: every instance also holds the prompt's first chunk
(a shared system prompt, say), so every instance is a candidate and lookup reads them all.
"""

from __future__ import annotations

import asyncio
import time

import redis
import torch

from bench import _http
from bench._harness import (
    CHUNK_SIZE,
    Figure,
    busy_fraction,
    controller,
    cpu_jiffies,
    cpu_seconds,
    entries,
    ingest,
    main,
    ms,
    note,
    percentile,
    publish,
    random_prompt,
    redis_server,
    register,
    unrelated_entries,
    workdir,
)
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
        publish(client, instance_id, held + unrelated_entries(rng, CHUNKS_PER_INSTANCE - len(held)))


async def _in_process(redis_url: str, tokens: list[int], samples: int) -> list[float]:
    """PrefixIndex.lookup called in this process: the index's part of a lookup, without HTTP, JSON or uvicorn."""
    client = await redis_conn.connect_async(redis_url)
    index = PrefixIndex(client)
    latencies = []
    try:
        for _ in range(samples):
            started = time.perf_counter()
            await index.lookup(tokens)
            latencies.append(time.perf_counter() - started)
    finally:
        await index.aclose()
        await client.aclose()
    return latencies


def _layout(status: int, body: bytes) -> dict[str, int]:
    """A /lookup answer's layout as {instance: tokens held}; raises unless it is a 200 with a layout."""
    answer = _http.check_json(status, body)
    return {instance: held for instance, (_, held) in answer["layout_info"].items()}


async def _timed(conn: _http.Connection, request: bytes, samples: int, expected: dict[str, int]) -> list[float]:
    """`samples` sequential lookups over `conn`; every answer must be a 200 with exactly the `expected` layout
    (checked after its latency is taken)."""
    latencies = []
    for _ in range(samples):
        started = time.perf_counter()
        status, body = await conn.send(request)
        latencies.append(time.perf_counter() - started)
        if (layout := _layout(status, body)) != expected:
            raise _http.HTTPError(
                f"/lookup layout is wrong: {len(layout)} instances, "
                f"expected {len(expected)}: {dict(list(layout.items())[:5])!r}..."
            )
    return latencies


async def _over_http(
    base_url: str, request: bytes, samples: int, warmup: int, expected: dict[str, int], controller_pid: int
) -> tuple[list[float], float, float]:
    """Sequential lookups over a fresh keep-alive connection (an idle one would have been closed by the
    server meanwhile); returns their latencies, controller CPU seconds per lookup and how busy the box was."""
    conn = await _http.Connection.open(base_url)
    try:
        await _timed(conn, request, warmup, expected)
        cpu_before, box_before = cpu_seconds(controller_pid), cpu_jiffies()
        latencies = await _timed(conn, request, samples, expected)
        cpu_after, box_after = cpu_seconds(controller_pid), cpu_jiffies()
    finally:
        await conn.close()
    return latencies, (cpu_after - cpu_before) / samples, busy_fraction(box_before, box_after)


def run(quick: bool) -> list[Figure]:
    samples, warmup = (300, 30) if quick else (2000, 100)
    rng = torch.Generator().manual_seed(1)
    tokens = random_prompt(rng).tolist()
    request = _http.encode_post("/lookup", {"tokens": tokens})
    expected = {_instance(n): chunks * CHUNK_SIZE for n, chunks in HOLDERS.items()}
    prompt = entries(tokens)
    figures: list[Figure] = []
    http_p50: dict[int, float] = {}
    index_p50: dict[int, float] = {}
    with workdir() as tmp, redis_server(tmp) as server, controller(server.url, tmp) as ctl, _http.runner() as loop:
        client = redis_conn.connect(server.url)
        try:
            populated = 0
            for count in INSTANCE_COUNTS:
                started = time.perf_counter()
                _populate(client, rng, range(populated, count), prompt)
                note(
                    f"lookup: fleet now {count} instances x {CHUNKS_PER_INSTANCE} chunks "
                    f"(+{(count - populated) * CHUNKS_PER_INSTANCE} chunks in {time.perf_counter() - started:.1f} s)"
                )
                populated = count
                latencies, ctl_cpu, busy = loop.run(_over_http(ctl.url, request, samples, warmup, expected, ctl.pid))
                direct = loop.run(_in_process(server.url, tokens, samples))
                p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                http_p50[count], index_p50[count] = p50, percentile(direct, 50)
                figures.append(
                    Figure(
                        "/lookup p50/p99 (HTTP)",
                        f"{count} inst x {CHUNKS_PER_INSTANCE} chunks; layout {len(expected)} inst, checked; "
                        f"{samples} seq",
                        f"{ms(p50)} / {ms(p99)} (index alone {ms(index_p50[count])}, ctl CPU {ms(ctl_cpu)}, "
                        f"box {busy:.0%} busy)",
                        "p50 <= 2 ms" + (" (LMCache 0.5.6: 75 ms)" if count == 1000 else ""),
                        p50 <= TARGET_P50_S,
                        {
                            "instances": count,
                            "p50_s": p50,
                            "p99_s": p99,
                            "index_alone_p50_s": index_p50[count],
                            "controller_cpu_s_per_lookup": ctl_cpu,
                            "box_busy": busy,
                            "layout_size": len(expected),
                        },
                    )
                )
            largest, smallest = INSTANCE_COUNTS[-1], INSTANCE_COUNTS[0]
            ratio = http_p50[largest] / http_p50[smallest]
            index_ratio = index_p50[largest] / index_p50[smallest]
            figures.append(
                Figure(
                    "/lookup flatness",
                    f"p50 at {largest} / p50 at {smallest} instances",
                    f"{ratio:.2f}x (index alone {index_ratio:.2f}x)",
                    f"flat (<= {FLAT_RATIO}x)",
                    ratio <= FLAT_RATIO,
                    {"ratio": ratio, "index_alone_ratio": index_ratio},
                )
            )
            figures.append(
                _worst_case(loop, client, ctl.url, request, prompt[0], expected, largest, 30 if quick else 200, ctl.pid)
            )
        finally:
            client.close()
    return figures


def _worst_case(
    loop: asyncio.Runner,
    client: redis.Redis,
    base_url: str,
    request: bytes,
    first: IndexEntry,
    expected: dict[str, int],
    count: int,
    samples: int,
    controller_pid: int,
) -> Figure:
    """Worst case, no target: every instance also holds the prompt's first chunk (a shared system prompt, say).

    The head set then names the whole fleet as candidates, and lookup reads every instance's index,
    so its cost grows with the fleet: this row shows by how much, it is not a figure to meet.
    """
    for number in range(count):
        if number not in HOLDERS:
            ingest(client, _instance(number), [first])
    everyone = {_instance(n): expected.get(_instance(n), CHUNK_SIZE) for n in range(count)}
    note(f"lookup: worst case, all {count} instances hold the prompt's first chunk")
    latencies, ctl_cpu, _ = loop.run(_over_http(base_url, request, samples, 2, everyone, controller_pid))
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return Figure(
        "  /lookup WORST CASE (no target)",
        f"all {count} inst share the prompt's 1st chunk, so all are candidates; layout {len(everyone)} inst, "
        f"checked; {samples} seq",
        f"{ms(p50)} / {ms(p99)} (ctl CPU {ms(ctl_cpu)})",
        "none: worst case",
        data={"p50_s": p50, "p99_s": p99, "layout_size": len(everyone), "controller_cpu_s_per_lookup": ctl_cpu},
    )


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
