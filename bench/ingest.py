"""Index ingest of one agent: chunks per second from first admission to completed flush, and what it costs.

An engine admits chunks as fast as it computes KV, and every admission must reach the index
for lookups to find it. This drives one IndexWriter as a backend would (admitted() calls, with
the writer's background flush thread running, as in an agent), then flushes and stops the
clock. Chunk keys come from distinct random 8192-token prompts and are computed beforehand,
so hashing (which the engine does anyway) is not counted.

The machine these run on is shared, so wall-clock rates are noisy: each run also reports the
CPU the ingesting process spent (both its threads: admissions and flushes) and the CPU Redis
spent, per chunk, and the rate that process CPU alone would allow. Besides ingest:
- idle: the CPU of the writer's flush thread, and of the whole process, over a stretch with nothing admitted;
- trickle: how long one admission, alone, takes to reach Redis by the background thread;
- clear: a clear of the whole location, as an agent's command handler does it (the purge on the
  handler's path, then the head-hint withdrawal done in the background), in agent CPU.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import redis
import torch

from bench._harness import CPU, Figure, main, note, percentile, redis_server, register, unrelated_entries, workdir
from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.index_writer import IndexWriter
from kvbus.shared import keys, redis_conn

INSTANCE = "bench-ingest"
TARGET_RATE = 600_000.0
IDLE_TARGET = 0.0005  # a core's share
TRICKLE_TARGET_MS = 5.0
RUNS = 3
SMALL_CLEAR, SMALL_CLEARS = 1000, 20  # the clear: an instance holding 1000 chunks


@dataclass
class Ingest:
    seconds: float
    process_cpu_s: float  # both the admitting and the flushing thread
    redis_cpu_s: float


def _redis_cpu(client: redis_conn.Client) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _thread_cpu(name_prefix: str) -> float:
    """CPU seconds of the live thread whose name starts with `name_prefix`."""
    thread = next(t for t in threading.enumerate() if t.name.startswith(name_prefix))
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def ingest(client: redis_conn.Client, instance_id: str, admitted: list[IndexEntry]) -> Ingest:
    """One IndexWriter, its thread on, indexing `admitted` at CPU; checks that the index holds them all."""
    writer = IndexWriter(client, instance_id, 0)
    writer.start()
    try:
        redis_before = _redis_cpu(client) if isinstance(client, redis.Redis) else 0.0
        started, cpu_started = time.perf_counter(), time.process_time()
        for entry in admitted:
            writer.admitted(CPU, entry)
        writer.flush()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        redis_cpu = _redis_cpu(client) - redis_before if isinstance(client, redis.Redis) else 0.0
    finally:
        writer.stop()
    indexed = client.hlen(keys.index(instance_id, 0, CPU))
    if indexed != len(admitted):
        raise RuntimeError(f"the index holds {indexed} chunks after {len(admitted)} admissions")
    return Ingest(elapsed, cpu, redis_cpu)


def measure(redis_url: str, total: int, instance_id: str = INSTANCE) -> float:
    """Seconds one IndexWriter takes to index `total` admissions on the Redis (or Redis Cluster) at `redis_url`."""
    admitted = unrelated_entries(torch.Generator().manual_seed(2), total)
    client = redis_conn.connect(redis_url)
    try:
        register(client, instance_id)
        note(f"ingest: {total} admissions")
        return ingest(client, instance_id, admitted).seconds
    finally:
        client.close()


def idle(client: redis_conn.Client, seconds: float) -> tuple[float, float]:
    """(flush thread, whole process) CPU as a share of a core, over `seconds` of an IndexWriter with nothing to do."""
    writer = IndexWriter(client, "bench-idle", 0)
    writer.start()
    try:
        writer.admitted(CPU, IndexEntry("0" * 64, 256, True))  # one flush first, as an agent that did some work
        writer.written_within(5.0)
        thread0, process0 = _thread_cpu("kvbus-index-bench-idle"), time.process_time()
        time.sleep(seconds)
        thread, process = _thread_cpu("kvbus-index-bench-idle") - thread0, time.process_time() - process0
    finally:
        writer.stop()
    return thread / seconds, process / seconds


def trickle(client: redis_conn.Client, samples: int) -> list[float]:
    """Seconds from admitted() to the chunk being in Redis, for admissions far apart (the thread's own pace)."""
    writer = IndexWriter(client, "bench-trickle", 0)
    index = keys.index("bench-trickle", 0, CPU)
    latencies = []
    writer.start()
    try:
        for n in range(samples):
            key = f"{n:064x}"
            started = time.perf_counter()
            writer.admitted(CPU, IndexEntry(key, 256, n % 32 == 0))
            while not client.hexists(index, key):
                time.sleep(0.0002)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    finally:
        writer.stop()
    return latencies


def clear(client: redis_conn.Client, admitted: list[IndexEntry]) -> tuple[float, float, float]:
    """(purge on the handler's path, head-hint withdrawal after it) in this process's CPU seconds, and the
    withdrawal's wall seconds, for a clear of `admitted` at CPU."""
    writer = IndexWriter(client, "bench-clear", 0)
    for entry in admitted:
        writer.admitted(CPU, entry)
    writer.flush()
    cpu0 = time.process_time()
    writer.cleared(CPU)
    writer.flush()  # what the command handler does before it answers
    cpu1, wall1 = time.process_time(), time.perf_counter()
    writer.drain()  # the background thread's part
    cpu2, wall2 = time.process_time(), time.perf_counter()
    heads = sum(1 for e in admitted if e.is_head)
    member = keys.head_member("bench-clear", 0)
    if client.sismember(keys.head(CPU, admitted[0].key), member) or client.scard(keys.heads("bench-clear", 0, CPU)):
        raise RuntimeError(f"head hints of {heads} prompts left after the clear")
    return cpu1 - cpu0, cpu2 - cpu1, wall2 - wall1


def run(quick: bool) -> list[Figure]:
    total = 100_000 if quick else 200_000
    admitted = unrelated_entries(torch.Generator().manual_seed(2), total)
    with workdir() as tmp, redis_server(tmp) as server:
        client = redis_conn.connect(server.url)
        try:
            runs = []
            for n in range(RUNS):
                instance_id = f"{INSTANCE}-{n}"
                register(client, instance_id)
                note(f"ingest: {total} admissions, run {n + 1} of {RUNS}")
                runs.append(ingest(client, instance_id, admitted))
            note("idle")
            idle_thread, idle_process = idle(client, 10.0)
            note("trickle")
            late = trickle(client, 30 if quick else 100)
            note("clear")
            clears = [clear(client, admitted) for _ in range(RUNS)]
            small = [clear(client, admitted[:SMALL_CLEAR]) for _ in range(SMALL_CLEARS)]
        finally:
            client.close()
    rate = statistics.median(total / r.seconds for r in runs)
    cpu_us = statistics.median(r.process_cpu_s for r in runs) / total * 1e6
    redis_us = statistics.median(r.redis_cpu_s for r in runs) / total * 1e6
    purge_ms, forget_ms, forget_wall_ms = (statistics.median(c[i] for c in clears) * 1e3 for i in range(3))
    small_purge_us, small_forget_us = (statistics.median(c[i] for c in small) * 1e6 for i in range(2))
    return [
        Figure(
            "index ingest",
            f"1 IndexWriter, flush thread on; {total // 1000}k chunks of 8192-token prompts; median of {RUNS}",
            f"{rate:,.0f} chunks/s (process CPU {cpu_us:.2f} us, Redis CPU {redis_us:.2f} us a chunk)",
            f">= {TARGET_RATE:,.0f} chunks/s",
            rate >= TARGET_RATE,
            {"chunks_per_s": rate, "process_cpu_us": cpu_us, "redis_cpu_us": redis_us, "chunks": total},
        ),
        Figure(
            "ingest by process CPU",
            "chunks per second of the ingesting process's CPU (both threads), as if it had a core to itself",
            f"{1e6 / cpu_us:,.0f} chunks/s",
            f">= {TARGET_RATE:,.0f} chunks/s",
            1e6 / cpu_us >= TARGET_RATE,
            {"chunks_per_cpu_s": 1e6 / cpu_us},
        ),
        Figure(
            "idle IndexWriter",
            "CPU over 10 s with nothing admitted: its flush thread (the whole process)",
            f"{idle_thread:.4%} of a core ({idle_process:.4%})",
            f"<= {IDLE_TARGET:.2%}",
            idle_process <= IDLE_TARGET,
            {"thread_share": idle_thread, "process_share": idle_process},
        ),
        Figure(
            "trickle flush latency",
            "one admission alone, until Redis holds it (background thread), p50 / p99",
            f"{percentile(late, 50) * 1e3:.2f} / {percentile(late, 99) * 1e3:.2f} ms",
            f"p99 <= {TRICKLE_TARGET_MS:.0f} ms",
            percentile(late, 99) * 1e3 <= TRICKLE_TARGET_MS,
            {"p50_ms": percentile(late, 50) * 1e3, "p99_ms": percentile(late, 99) * 1e3},
        ),
        Figure(
            "clear of a location",
            f"{total // 1000}k chunks: purge on the handler's path, then head hints withdrawn; CPU, median of {RUNS}",
            f"purge {purge_ms:.1f} ms CPU; withdrawal {forget_ms:.1f} ms CPU ({forget_wall_ms:.1f} ms wall)",
            "-",
            None,
            {"purge_cpu_ms": purge_ms, "forget_cpu_ms": forget_ms, "forget_wall_ms": forget_wall_ms},
        ),
        Figure(
            "clear of 1000 chunks",
            f"as above, {SMALL_CLEAR} chunks (32 prompts); CPU, median of {SMALL_CLEARS}",
            f"purge {small_purge_us:.0f} us CPU; withdrawal {small_forget_us:.0f} us CPU",
            "-",
            None,
            {"purge_cpu_us": small_purge_us, "forget_cpu_us": small_forget_us},
        ),
    ]


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
