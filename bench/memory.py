"""Redis memory per indexed chunk: INFO used_memory growth over an ingest, divided by the chunks.

The index lives in Redis memory, so bytes per chunk set how many chunks one Redis can index.
Each chunk costs a field in its instance's index hash; each prompt (32 chunks here) also costs
a member of the instance's head set and a global head set keyed by its first chunk, which is
part of the cost and is included. The breakdown comes from MEMORY USAGE of each key.
"""

from __future__ import annotations

import torch

from bench._harness import CPU, Figure, ingest, main, note, redis_server, register, unrelated_entries, workdir
from kvbus.shared import keys, redis_conn

INSTANCE = "bench-memory"
TARGET_BYTES = 150.0


def run(quick: bool) -> list[Figure]:
    total = 100_000 if quick else 200_000
    admitted = unrelated_entries(torch.Generator().manual_seed(4), total)
    heads = [entry.key for entry in admitted if entry.is_head]
    with workdir() as tmp, redis_server(tmp) as server:
        client = redis_conn.connect(server.url)
        try:
            register(client, INSTANCE)
            before = int(client.info("memory")["used_memory"])
            note(f"memory: indexing {total} chunks")
            ingest(client, INSTANCE, admitted)
            after = int(client.info("memory")["used_memory"])
            pipe = client.pipeline(transaction=False)
            pipe.memory_usage(keys.index(INSTANCE, CPU), samples=0)
            pipe.memory_usage(keys.heads(INSTANCE, CPU), samples=0)
            pipe.object("encoding", keys.index(INSTANCE, CPU))
            for head in heads:
                pipe.memory_usage(keys.head(CPU, head), samples=0)
            index_bytes, heads_bytes, encoding, *global_heads = pipe.execute()
        finally:
            client.close()
    per_chunk = (after - before) / total
    return [
        Figure(
            "Redis memory per chunk",
            f"used_memory delta over {total // 1000}k chunks, 32-chunk prompts",
            f"{per_chunk:.0f} B",
            f"<= {TARGET_BYTES:.0f} B",
            per_chunk <= TARGET_BYTES,
            {"bytes_per_chunk": per_chunk, "chunks": total, "used_memory_delta": after - before},
        ),
        Figure(
            "  of which",
            f"MEMORY USAGE; index hash is {encoding}",
            f"index {index_bytes / total:.0f} B, heads {heads_bytes / total:.0f} B, "
            f"global heads {sum(global_heads) / total:.0f} B",
            data={
                "index_bytes_per_chunk": index_bytes / total,
                "heads_bytes_per_chunk": heads_bytes / total,
                "global_heads_bytes_per_chunk": sum(global_heads) / total,
            },
        ),
    ]


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
