"""`/pin`, `/move` and `/compress` round trips over HTTP, on 1000-chunk prompts held by real agent processes.

Two `kvbus agent` processes (instances `bench-a` and `bench-b`, each with a peer endpoint) and a
controller run against their own redis-server. `bench-a` starts holding one prompt of 1000
chunks (256,000 tokens; synthetic fp16 KV, 64 KiB per chunk, 64 MiB in all). Each timed request
names all 256,000 tokens:

- `/pin` then `/unpin` of the whole prompt (each answer must say 256,000 tokens);
- `/move` of the whole prompt from one instance to the other and back, through the agents' peer
  endpoints: every chunk is sent over TCP with its checksum, stored and indexed by the
  destination, then dropped by the source; the lookup after each move must name only the
  destination;
- `/compress` int8 then `/decompress` of every chunk (`tokens` empty), and the same for zlib.

Chunks/s is 1000 chunks over the round trip's p50.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from bench._harness import Figure, agents, controller, free_port, main, ms, note, percentile, redis_server, workdir

INSTANCES = ("bench-a", "bench-b")
CHUNKS = 1000
TOKENS = list(range(1, CHUNKS * 256 + 1))
CPU = "LocalCPUBackend"


def _post(client: httpx.Client, url: str, body: dict[str, Any], expect: int) -> float:
    started = time.perf_counter()
    response = client.post(url, json=body)
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or response.json()["num_tokens"] != expect:
        raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
    return elapsed


def _figure(name: str, samples: list[float], rounds: int) -> Figure:
    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    return Figure(
        name,
        f"{CHUNKS} chunks (256k tokens, 64 MiB), {rounds} rounds, agents in their own processes",
        f"p50 {ms(p50)}, p99 {ms(p99)}; {CHUNKS / p50:,.0f} chunks/s",
        data={"p50_s": p50, "p99_s": p99, "chunks_per_s": CHUNKS / p50},
    )


def run(quick: bool) -> list[Figure]:
    rounds = 3 if quick else 10
    peers = {instance: free_port() for instance in INSTANCES}
    with workdir() as scratch:
        prompt_file = scratch / "prompt.txt"
        prompt_file.write_text(",".join(map(str, TOKENS)))
        with (
            redis_server(scratch) as server,
            controller(server.url, scratch) as ctl,
            agents(
                server.url,
                INSTANCES[:1],
                scratch,
                args=["--preload-tokens", f"@{prompt_file}"],
                extra_config=lambda i: {"p2p_host": "127.0.0.1", "p2p_init_ports": peers[i]},
            ),
            agents(
                server.url,
                INSTANCES[1:],
                scratch,
                extra_config=lambda i: {"p2p_host": "127.0.0.1", "p2p_init_ports": peers[i]},
            ),
            httpx.Client(timeout=60) as client,
        ):
            _wait_held(client, ctl.url)
            note(f"{rounds} rounds of pin/unpin, move there and back, compress/decompress over {CHUNKS} chunks")
            pins, unpins, moves, int8, int8_back, zlib, zlib_back = [], [], [], [], [], [], []
            holder, other = INSTANCES
            for _ in range(rounds):
                pins.append(
                    _post(
                        client,
                        f"{ctl.url}/pin",
                        {"instance_id": holder, "location": CPU, "tokens": TOKENS},
                        len(TOKENS),
                    )
                )
                unpins.append(
                    _post(
                        client,
                        f"{ctl.url}/unpin",
                        {"instance_id": holder, "location": CPU, "tokens": TOKENS},
                        len(TOKENS),
                    )
                )
                for method, there, back in (("int8", int8, int8_back), ("zlib", zlib, zlib_back)):
                    there.append(
                        _post(
                            client,
                            f"{ctl.url}/compress",
                            {"instance_id": holder, "location": CPU, "method": method},
                            len(TOKENS),
                        )
                    )
                    back.append(
                        _post(
                            client,
                            f"{ctl.url}/decompress",
                            {"instance_id": holder, "location": CPU, "method": method},
                            len(TOKENS),
                        )
                    )
                moves.append(
                    _post(
                        client,
                        f"{ctl.url}/move",
                        {"old_position": [holder, CPU], "new_position": [other, CPU], "tokens": TOKENS},
                        len(TOKENS),
                    )
                )
                layout = client.post(f"{ctl.url}/lookup", json={"tokens": TOKENS[:512]}).json()["layout_info"]
                if list(layout) != [other]:
                    raise RuntimeError(f"after a move to {other}, lookup says {layout}")
                holder, other = other, holder
    return [
        _figure("/pin", pins, rounds),
        _figure("/unpin", unpins, rounds),
        _figure("/move between two instances", moves, rounds),
        _figure("/compress int8", int8, rounds),
        _figure("/decompress int8", int8_back, rounds),
        _figure("/compress zlib", zlib, rounds),
        _figure("/decompress zlib", zlib_back, rounds),
    ]


def _wait_held(client: httpx.Client, base: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        layout = client.post(f"{base}/lookup", json={"tokens": TOKENS}).json()["layout_info"]
        if layout.get(INSTANCES[0]) == [CPU, len(TOKENS)]:
            return
        time.sleep(0.2)
    raise TimeoutError("the agent did not come to hold the prompt")


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
