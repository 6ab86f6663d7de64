"""Redis CPU and memory per kvbus operation, on one redis-server: the inputs of docs/capacity.md.

Every cost is measured two ways around a workload of one kind of operation, on a Redis that does
nothing else:

- `INFO commandstats`: the growth of `usec` summed over every command but scripts, divided by the
  operations: time inside command execution only (a script's entry repeats the time of the commands
  it calls, so scripts are left out and the Lua interpreter's own time is in neither).
- the redis-server process's CPU time (`INFO cpu` user + system), divided by the operations: what a
  Redis core actually spends, with reading requests, parsing them and writing replies included.
  Sizing uses this one; the gap between the two is the per-call network cost, which dominates for
  cheap commands.

Workloads:
- lookup: PrefixIndex.lookup in this process (the controller's own code, without HTTP), for k
  candidates each holding m chunks of the looked-up 32-chunk prompt (k in 1, 10, 100, 1000; m in
  8, 32). A candidate is an instance whose rank holds the prompt's first chunk.
- clear: `/clear` over HTTP through a controller process to one `kvbus agent` process, sequentially.
  The agent and the controller also heartbeat and poll while idle; that background, measured over
  an idle period beforehand, is subtracted.
- admitted chunk: one IndexWriter indexing 100k chunks of 32-chunk prompts (bench/ingest.py's way).
- heartbeat: Registration.heartbeat() of 1000 registered instances, one after another.
- memory: `used_memory` growth per indexed chunk (over the ingest), per registered instance (1000
  registrations, each with one heartbeat), and `MEMORY USAGE` of clear's command records.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import redis
import torch

from bench import _http, clear
from bench._harness import (
    CHUNK_SIZE,
    CPU,
    Figure,
    agent,
    controller,
    entries,
    ingest,
    main,
    note,
    random_prompt,
    redis_server,
    register,
    unrelated_entries,
    workdir,
)
from kvbus.agent.index_writer import IndexWriter
from kvbus.controller.lookup import PrefixIndex
from kvbus.shared import keys, redis_conn

CANDIDATES = (1, 10, 100, 1000)
HELD_CHUNKS = (8, 32)
IDLE_S = 3.0
_SCRIPT_STATS = {"cmdstat_eval", "cmdstat_evalsha", "cmdstat_eval_ro", "cmdstat_evalsha_ro", "cmdstat_fcall"}


class Meter:
    """Redis's CPU over a stretch of work: commandstats usec and the server process's CPU seconds."""

    def __init__(self, client: redis.Redis, pid: int) -> None:
        self.client, self.pid = client, pid

    def _usec(self) -> int:
        # A script's own entry counts the commands it calls, and so do theirs: scripts are left out, so that
        # each command counts once (the Lua interpreter's own time is then in neither).
        stats = self.client.info("commandstats")
        return sum(int(stat["usec"]) for name, stat in stats.items() if name not in _SCRIPT_STATS)

    def _cpu(self) -> float:
        # INFO cpu counts in microseconds; /proc's ticks are 10 ms, too coarse for a few hundred calls.
        cpu = self.client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def start(self) -> None:
        self._usec0, self._cpu0, self._t0 = self._usec(), self._cpu(), time.perf_counter()

    def stop(self, operations: int, background_per_s: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
        """(commandstats us, process CPU us) per operation, less `background_per_s` (us/s of each) for the span."""
        wall = time.perf_counter() - self._t0
        usec = self._usec() - self._usec0 - background_per_s[0] * wall
        cpu = (self._cpu() - self._cpu0) * 1e6 - background_per_s[1] * wall
        return usec / operations, cpu / operations

    def idle(self, seconds: float) -> tuple[float, float]:
        """Background us/s of each, over `seconds` of nothing but what already runs."""
        self.start()
        time.sleep(seconds)
        usec, cpu = self.stop(1)
        return usec / seconds, cpu / seconds


def _lookup_costs(url: str, client: redis.Redis, meter: Meter, quick: bool) -> list[dict[str, float]]:
    rng = torch.Generator().manual_seed(5)
    rows = []
    for held in HELD_CHUNKS:
        for count in CANDIDATES:
            tokens = random_prompt(rng).tolist()
            prompt = entries(tokens)
            for n in range(count):
                instance_id = f"cap-{held}-{n:04d}"
                if not client.exists(keys.info(instance_id)):
                    register(client, instance_id, ttl_s=3600)
                ingest(client, instance_id, prompt[:held])
            samples = max(20, (200 if quick else 1000) // max(1, count // 10))
            latency, (usec, cpu) = asyncio.run(_lookups(url, tokens, samples, meter, count, held))
            rows.append({"candidates": count, "chunks": held, "usec": usec, "cpu_us": cpu, "latency_s": latency})
            note(f"capacity: lookup, {count} candidates x {held} chunks: {cpu:.0f} us Redis CPU")
    return rows


async def _lookups(
    url: str, tokens: list[int], samples: int, meter: Meter, count: int, held: int
) -> tuple[float, tuple[float, float]]:
    """Seconds per lookup, and Redis's (commandstats us, CPU us) per lookup; every answer is checked."""
    aclient = await redis_conn.connect_async(url)
    index = PrefixIndex(aclient)
    try:
        for _ in range(3):
            await index.lookup(tokens)
        meter.start()
        started = time.perf_counter()
        for _ in range(samples):
            matches = await index.lookup(tokens)
            if len(matches) != count or any(m.num_tokens != held * CHUNK_SIZE for m in matches):
                raise RuntimeError(f"lookup found {len(matches)} matches, expected {count} of {held} chunks")
        elapsed = time.perf_counter() - started
        cost = meter.stop(samples)
    finally:
        await index.aclose()
        await aclient.aclose()
    return elapsed / samples, cost


def _clear_costs(url: str, client: redis.Redis, meter: Meter, tmp: Any, quick: bool) -> dict[str, float]:
    count = 300 if quick else 1000
    instance_id = "cap-clear"
    with controller(url, tmp) as ctl, agent(url, instance_id, tmp):
        request = clear._request(instance_id)
        _http.run(clear._Load(ctl.url, [request], 1).measure(50, {}))  # warm up
        background = meter.idle(IDLE_S)
        meter.start()
        _http.run(clear._Load(ctl.url, [request], 1).measure(count, {}))
        usec, cpu = meter.stop(count, background)
        record = _record_bytes(client)
    return {
        "usec": usec,
        "cpu_us": cpu,
        "background_cpu_us_per_s": background[1],
        "record_bytes": record,
        "clears": count,
    }


def _record_bytes(client: redis.Redis) -> float:
    """Mean MEMORY USAGE of the newest command records (each answered by its one worker)."""
    sizes = []
    for shard in range(keys.COMMAND_SHARDS):
        for event_id in client.lrange(keys.command_records(shard), -5, -1):
            sizes.append(client.memory_usage(keys.command_record(event_id), samples=0) or 0)
    if not sizes:
        raise RuntimeError("no command records found")
    return sum(sizes) / len(sizes)


def _ingest_costs(client: redis.Redis, meter: Meter, quick: bool) -> dict[str, float]:
    total = 100_000
    admitted = unrelated_entries(torch.Generator().manual_seed(6), total)
    instance_id = "cap-ingest"
    register(client, instance_id, ttl_s=3600)
    writer = IndexWriter(client, instance_id, 0)
    writer.start()
    memory = int(client.info("memory")["used_memory"])
    try:
        meter.start()
        for entry in admitted:
            writer.admitted(CPU, entry)
        writer.flush()
        usec, cpu = meter.stop(total)
    finally:
        writer.stop()
    grown = int(client.info("memory")["used_memory"]) - memory
    if client.hlen(keys.index(instance_id, 0, CPU)) != total:
        raise RuntimeError("the index does not hold every admitted chunk")
    return {"usec": usec, "cpu_us": cpu, "bytes": grown / total, "chunks": total}


def _heartbeat_costs(client: redis.Redis, meter: Meter) -> dict[str, float]:
    count = 1000
    memory = int(client.info("memory")["used_memory"])
    fleet = []
    for n in range(count):
        registration = register(client, f"cap-beat-{n:04d}", ttl_s=3600)
        registration.heartbeat()
        fleet.append(registration)
    grown = int(client.info("memory")["used_memory"]) - memory
    meter.start()
    for registration in fleet:
        registration.heartbeat()
    usec, cpu = meter.stop(count)
    return {"usec": usec, "cpu_us": cpu, "registration_bytes": grown / count, "heartbeats": count}


def _fit(rows: list[dict[str, float]]) -> tuple[float, float, float]:
    """Redis CPU us = a + k * (b + c * m): a from the one-candidate rows, each m's slope from its 1 and 1000
    candidate rows, then b and c from the two slopes (a least-squares fit would let the 1000-candidate rows
    swamp the fixed cost)."""
    cost = {(int(r["candidates"]), int(r["chunks"])): r["cpu_us"] for r in rows}
    low, high = min(CANDIDATES), max(CANDIDATES)
    a = sum(cost[low, m] for m in HELD_CHUNKS) / len(HELD_CHUNKS)
    slopes = [(cost[high, m] - cost[low, m]) / (high - low) for m in HELD_CHUNKS]
    (m1, m2), (s1, s2) = HELD_CHUNKS, slopes
    c = (s2 - s1) / (m2 - m1)
    return a, s1 - c * m1, c


def run(quick: bool) -> list[Figure]:
    figures: list[Figure] = []
    with workdir() as tmp, redis_server(tmp) as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        meter = Meter(client, server.pid)
        try:
            note("capacity: lookups")
            lookups = _lookup_costs(server.url, client, meter, quick)
            note("capacity: clears")
            clears = _clear_costs(server.url, client, meter, tmp, quick)
            note("capacity: ingest")
            admitted = _ingest_costs(client, meter, quick)
            note("capacity: heartbeats")
            beats = _heartbeat_costs(client, meter)
        finally:
            client.close()
    for row in lookups:
        figures.append(
            Figure(
                "Redis per lookup",
                f"{row['candidates']} candidates x {row['chunks']} chunks held, 32-chunk prompt",
                f"{row['cpu_us']:.0f} us CPU (commandstats {row['usec']:.0f} us); "
                f"lookup in process {row['latency_s'] * 1000:.2f} ms",
                data=row,
            )
        )
    a, b, c = _fit(lookups)
    figures.append(
        Figure(
            "  lookup model",
            "from the rows above; k candidates, m chunks each",
            f"Redis CPU us = {a:.0f} + k x ({b:.1f} + {c:.2f} x m)",
            data={"fixed_us": a, "per_candidate_us": b, "per_candidate_chunk_us": c},
        )
    )
    rows: list[tuple[str, str, dict[str, float], Callable[[dict[str, float]], str]]] = [
        (
            "Redis per clear",
            f"{clears['clears']:.0f} sequential /clear over HTTP, 1 agent; idle background subtracted",
            clears,
            lambda r: (
                f"{r['cpu_us']:.0f} us CPU (commandstats {r['usec']:.0f} us); "
                f"background {r['background_cpu_us_per_s']:.0f} us/s"
            ),
        ),
        (
            "Redis per admitted chunk",
            f"1 IndexWriter, {admitted['chunks'] // 1000:.0f}k chunks",
            admitted,
            lambda r: f"{r['cpu_us']:.2f} us CPU (commandstats {r['usec']:.2f} us)",
        ),
        (
            "Redis per heartbeat",
            f"{beats['heartbeats']:.0f} registered instances, one heartbeat each",
            beats,
            lambda r: f"{r['cpu_us']:.0f} us CPU (commandstats {r['usec']:.0f} us)",
        ),
    ]
    for name, conditions, row, text in rows:
        figures.append(Figure(name, conditions, text(row), data=row))
    figures.append(
        Figure(
            "Redis memory",
            "used_memory growth; MEMORY USAGE for records",
            f"{admitted['bytes']:.0f} B per indexed chunk, {beats['registration_bytes']:.0f} B per registered "
            f"instance (1 worker, heartbeated), {clears['record_bytes']:.0f} B per command record",
            data={
                "chunk_bytes": admitted["bytes"],
                "registration_bytes": beats["registration_bytes"],
                "record_bytes": clears["record_bytes"],
            },
        )
    )
    return figures


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
