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


def run(quick: bool) -> list[Figure]:
    total = 100_000 if quick else 200_000
    admitted = unrelated_entries(torch.Generator().manual_seed(2), total)
    with workdir() as tmp, redis_server(tmp) as server:
        client = redis_conn.connect(server.url)
        try:
            register(client, INSTANCE)
            writer = IndexWriter(client, INSTANCE, 0)
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
            indexed = client.hlen(keys.index(INSTANCE, 0, CPU))
        finally:
            client.close()
    if indexed != total:
        raise RuntimeError(f"the index holds {indexed} chunks after {total} admissions")
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
