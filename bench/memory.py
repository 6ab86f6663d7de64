"""Redis memory per indexed chunk: INFO used_memory growth over an ingest, divided by the chunks.

The index lives in Redis memory, so bytes per chunk set how many chunks one Redis can index.
Each rank (worker) of an instance has an index of its own, so a chunk costs a field in the index
hash of every rank that holds it; each prompt (32 chunks here) also costs, per rank, a member of
the rank's head set and a member of a global head set keyed by its first chunk, which is part of
the cost and is included. The instance is measured with 1, 2 and 8 ranks, each rank holding every
chunk (as the ranks of a tensor-parallel engine each hold their slice of it), on a fresh Redis
each time: per chunk and rank is the figure with a target, per chunk of the instance is what a
chunk costs over all its ranks. The breakdown comes from MEMORY USAGE of each key.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
import torch

from bench._harness import CPU, Figure, ingest, main, note, redis_server, register, unrelated_entries, workdir
from kvbus.agent.backends.base import IndexEntry
from kvbus.shared import keys, redis_conn

INSTANCE = "bench-memory"
TARGET_BYTES = 150.0
RANK_COUNTS = (1, 2, 8)


def run(quick: bool) -> list[Figure]:
    total = 100_000 if quick else 200_000
    admitted = unrelated_entries(torch.Generator().manual_seed(4), total)
    figures: list[Figure] = []
    for ranks in RANK_COUNTS:
        figures += _measure(admitted, ranks)
    return figures


def _measure(admitted: Sequence[IndexEntry], ranks: int) -> list[Figure]:
    total = len(admitted)
    with workdir() as tmp, redis_server(tmp) as server:
        client = redis_conn.connect(server.url)
        try:
            for rank in range(ranks):
                register(client, INSTANCE, rank)
            before = int(client.info("memory")["used_memory"])
            note(f"memory: indexing {total} chunks on each of {ranks} rank(s)")
            for rank in range(ranks):
                ingest(client, INSTANCE, admitted, rank)
            after = int(client.info("memory")["used_memory"])
            index_bytes, heads_bytes, global_bytes, encoding = _breakdown(client, admitted, ranks)
        finally:
            client.close()
    fields = total * ranks
    per_field = (after - before) / fields
    plural = "s" if ranks > 1 else ""
    head = Figure(
        f"Redis memory per chunk, {ranks} rank{plural}",
        f"used_memory delta over {total // 1000}k chunks on each of {ranks} rank{plural}, 32-chunk prompts; "
        "per chunk and rank",
        f"{per_field:.0f} B (per chunk of the instance {(after - before) / total:.0f} B)",
        f"<= {TARGET_BYTES:.0f} B",
        per_field <= TARGET_BYTES,
        {
            "ranks": ranks,
            "bytes_per_chunk_and_rank": per_field,
            "bytes_per_instance_chunk": (after - before) / total,
            "chunks": total,
            "used_memory_delta": after - before,
        },
    )
    breakdown = Figure(
        "  of which",
        f"MEMORY USAGE per chunk and rank; index hashes are {encoding}",
        f"index {index_bytes / fields:.0f} B, heads {heads_bytes / fields:.0f} B, "
        f"global heads {global_bytes / fields:.0f} B",
        data={
            "index_bytes_per_chunk": index_bytes / fields,
            "heads_bytes_per_chunk": heads_bytes / fields,
            "global_heads_bytes_per_chunk": global_bytes / fields,
        },
    )
    return [head, breakdown]


def _breakdown(client: redis.Redis, admitted: Sequence[IndexEntry], ranks: int) -> tuple[int, int, int, str]:
    """MEMORY USAGE summed over every rank's index hashes, every rank's head sets, and the global head sets."""
    pipe = client.pipeline(transaction=False)
    for rank in range(ranks):
        pipe.memory_usage(keys.index(INSTANCE, rank, CPU), samples=0)
        pipe.memory_usage(keys.heads(INSTANCE, rank, CPU), samples=0)
    pipe.object("encoding", keys.index(INSTANCE, 0, CPU))
    heads = [entry.key for entry in admitted if entry.is_head]
    for head in heads:
        pipe.memory_usage(keys.head(CPU, head), samples=0)
    replies = pipe.execute()
    per_rank, encoding, global_heads = replies[: 2 * ranks], replies[2 * ranks], replies[2 * ranks + 1 :]
    return sum(per_rank[::2]), sum(per_rank[1::2]), sum(global_heads), str(encoding)


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
