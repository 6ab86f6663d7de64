"""`GET /metrics` and `GET /dashboard.json` at 1000 and 10,000 instances, through a real controller process.

The fleet is written as agents write it: each instance registers one worker through the agent's own
`Registration` (a CPU location, 8 chunks indexed through the agent's `IndexWriter`, the consumer group
its command loop creates) and heartbeats once, which leaves its fleet entry (`kvbus:fleet:<shard>`) with
its backend stats, index sizes and backlog. Then one `kvbus controller` process on the same redis-server
is scraped over one keep-alive connection, sequentially, and every answer is checked: a `/metrics` with
`kvbus_redis_up 1.0` and a sample per instance, a dashboard listing every instance. For comparison, the
exact read the worker queries use (`fleet.read`, every instance's keys; what a scrape cost before the
fleet entries) is timed in process at 1000 instances.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial

import httpx
import redis
import redis.asyncio

from bench._harness import (
    CPU,
    SPACE,
    Figure,
    controller,
    entries,
    main,
    ms,
    note,
    percentile,
    random_prompt,
    redis_server,
    workdir,
)
from kvbus.agent.index_writer import IndexWriter
from kvbus.agent.registration import Registration, WorkerAddress
from kvbus.controller import fleet
from kvbus.shared import keys
from kvbus.shared.records import BackendStats

TARGETS_S = {1000: 0.050, 10_000: 0.500}
CHUNKS = 8


def _write_fleet(client: redis.Redis, count: int, start: int) -> None:
    """Instances `start` .. `count - 1`, registered, indexed and heartbeated as their agents would."""
    import torch

    held = entries(random_prompt(torch.Generator().manual_seed(start), CHUNKS * SPACE.chunk_size))
    stats = {str(CPU): BackendStats(chunks=CHUNKS, tokens=CHUNKS * SPACE.chunk_size, bytes=2**20, capacity_bytes=2**30)}
    for n in range(start, count):
        instance_id = f"bench-scrape-{n:05d}"
        registration = Registration(
            client,
            instance_id=instance_id,
            worker_id=0,
            space=SPACE,
            locations=[CPU],
            address=WorkerAddress("10.0.0.1", None, None),
            ttl_s=3600.0,
            stats=lambda: stats,
        )
        registration.register()
        client.xgroup_create(keys.commands(instance_id), keys.command_group(0), id="0", mkstream=True)
        writer = IndexWriter(client, instance_id, 0)
        writer.replaced(CPU, held)
        writer.drain()
        registration.heartbeat()


def _timed(get: Callable[[], httpx.Response], check: Callable[[httpx.Response], None], samples: int) -> list[float]:
    check(get())  # a first answer warms the controller's connections
    latencies = []
    for _ in range(samples):
        started = time.perf_counter()
        response = get()
        latencies.append(time.perf_counter() - started)
        check(response)
    return latencies


def _metrics_check(count: int) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        text = response.text
        if response.status_code != 200 or "kvbus_redis_up 1.0" not in text:
            raise RuntimeError(f"/metrics answered {response.status_code} without the fleet")
        if text.count("kvbus_workers_registered{") != count:
            raise RuntimeError(f"/metrics does not list {count} instances")

    return check


def _dashboard_check(count: int) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        if response.status_code != 200 or len(response.json()["instances"]) != count:
            raise RuntimeError(f"/dashboard.json answered {response.status_code} without {count} instances")

    return check


def _figure(path: str, count: int, latencies: list[float]) -> Figure:
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    target = TARGETS_S[count]
    return Figure(
        f"{path} at {count} instances",
        f"1 worker each, sequential over one connection, {len(latencies)} scrapes",
        f"p50 {ms(p50)}, p99 {ms(p99)}",
        f"p50 <= {ms(target)}",
        p50 <= target,
        data={"p50_s": p50, "p99_s": p99},
    )


async def _exact_read(url: str, samples: int) -> list[float]:
    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        await fleet.read(client)
        latencies = []
        for _ in range(samples):
            started = time.perf_counter()
            await fleet.read(client)
            latencies.append(time.perf_counter() - started)
        return latencies
    finally:
        await client.aclose()


def run(quick: bool) -> list[Figure]:
    samples = {1000: 10 if quick else 50, 10_000: 5 if quick else 20}
    figures = []
    with workdir() as tmp, redis_server(tmp) as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        written = 0
        for count in TARGETS_S:
            note(f"writing {count - written} more instances")
            _write_fleet(client, count, written)
            written = count
            with controller(server.url, tmp) as ctl, httpx.Client(base_url=ctl.url, timeout=30) as http:
                for path, check in (("/metrics", _metrics_check(count)), ("/dashboard.json", _dashboard_check(count))):
                    note(f"scraping {path} at {count} instances")
                    figures.append(_figure(path, count, _timed(partial(http.get, path), check, samples[count])))
            if count == 1000:
                exact = asyncio.run(_exact_read(server.url, samples[count]))
                figures.append(
                    Figure(
                        "exact fleet read at 1000 instances",
                        "fleet.read in process (every instance's keys): a scrape's read before the fleet entries",
                        f"p50 {ms(percentile(exact, 50))}, p99 {ms(percentile(exact, 99))}",
                        data={"p50_s": percentile(exact, 50), "p99_s": percentile(exact, 99)},
                    )
                )
    return figures


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
