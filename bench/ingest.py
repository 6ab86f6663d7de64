"""Index ingest of one agent: chunks per second from first admission to completed flush.

An engine admits chunks as fast as it computes KV, and every admission must reach the index
for lookups to find it. This drives one IndexWriter as a backend would (admitted() calls, with
the writer's background flush thread running, as in an agent), then flushes and stops the
clock. Chunk keys come from distinct random 8192-token prompts and are computed beforehand,
so hashing (which the engine does anyway) is not counted.
"""

from __future__ import annotations

import time

import torch

from bench._harness import CPU, Figure, main, note, redis_server, register, unrelated_entries, workdir
from kvbus.agent.index_writer import IndexWriter
from kvbus.shared import keys, redis_conn

INSTANCE = "bench-ingest"
TARGET_RATE = 100_000.0


def measure(redis_url: str, total: int, instance_id: str = INSTANCE) -> float:
    """Seconds one IndexWriter takes to index `total` admissions on the Redis (or Redis Cluster) at `redis_url`."""
    admitted = unrelated_entries(torch.Generator().manual_seed(2), total)
    client = redis_conn.connect(redis_url)
    try:
        register(client, instance_id)
        writer = IndexWriter(client, instance_id, 0)
        writer.start()
        try:
            note(f"ingest: {total} admissions")
            started = time.perf_counter()
            for entry in admitted:
                writer.admitted(CPU, entry)
            writer.flush()
            elapsed = time.perf_counter() - started
        finally:
            writer.stop()
        indexed = client.hlen(keys.index(instance_id, 0, CPU))
    finally:
        client.close()
    if indexed != total:
        raise RuntimeError(f"the index holds {indexed} chunks after {total} admissions")
    return elapsed


def run(quick: bool) -> list[Figure]:
    total = 100_000 if quick else 200_000
    with workdir() as tmp, redis_server(tmp) as server:
        elapsed = measure(server.url, total)
    rate = total / elapsed
    return [
        Figure(
            "index ingest",
            f"1 IndexWriter, flush thread on; {total // 1000}k chunks of 8192-token prompts",
            f"{rate:,.0f} chunks/s ({elapsed:.2f} s)",
            f">= {TARGET_RATE:,.0f} chunks/s",
            rate >= TARGET_RATE,
            {"chunks_per_s": rate, "seconds": elapsed, "chunks": total},
        )
    ]


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
