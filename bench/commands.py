"""`/pin`, `/move` and `/compress` round trips over HTTP, on 1000-chunk prompts held by real agent processes.

Two `kvbus agent` processes (instances `bench-a` and `bench-b`, each with a peer endpoint) and a
controller run against their own redis-server. `bench-a` starts holding one prompt of 1000
chunks (256,000 tokens; synthetic fp16 KV of shape [2, 4, 256, 2, 16], 128 KiB per chunk, 125 MiB
in all). Each timed request names all 256,000 tokens:

- `/pin` then `/unpin` of the whole prompt (each answer must say 256,000 tokens);
- `/move` of the whole prompt from one instance to the other and back, through the agents' peer
  endpoints: every chunk is sent over TCP with its checksum, stored and indexed by the
  destination, then dropped by the source; the lookup after each move must name only the
  destination;
- `/compress` int8 then `/decompress` of every chunk (`tokens` empty), and the same for zstd and
  zlib, the two lossless methods. Lossless `/compress` of these 1000 chunks is to take at most
  0.5 s (the issue's target, which counted them as 64 MiB; they are 125 MiB).

Chunks/s is 1000 chunks over the round trip's p50. For compress and decompress the holding agent's
CPU time (all its threads, from /proc) is given too: on a shared host it moves far less than the
round trip does.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from bench._harness import (
    Figure,
    agents,
    controller,
    cpu_seconds,
    free_port,
    main,
    ms,
    note,
    percentile,
    redis_server,
    workdir,
)

INSTANCES = ("bench-a", "bench-b")
CHUNKS = 1000
TOKENS = list(range(1, CHUNKS * 256 + 1))
CPU = "LocalCPUBackend"
LOSSLESS_TARGET_S = 0.5
METHODS = ("int8", "zstd", "zlib")


def _post(client: httpx.Client, url: str, body: dict[str, Any], expect: int) -> float:
    started = time.perf_counter()
    response = client.post(url, json=body)
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or response.json()["num_tokens"] != expect:
        named = {name: value for name, value in body.items() if name != "tokens"}
        raise RuntimeError(f"{url} {named}: {response.status_code} {response.text[:300]}")
    return elapsed


def _cpu_post(client: httpx.Client, url: str, body: dict[str, Any], expect: int, pid: int) -> tuple[float, float]:
    """The round trip's seconds, and the CPU seconds process `pid` spent meanwhile."""
    before = cpu_seconds(pid)
    elapsed = _post(client, url, body, expect)
    return elapsed, cpu_seconds(pid) - before


def _figure(
    name: str,
    samples: list[float],
    rounds: int,
    cpu: list[float] | None = None,
    target_s: float | None = None,
) -> Figure:
    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    data = {"p50_s": p50, "p99_s": p99, "chunks_per_s": CHUNKS / p50}
    measured = f"p50 {ms(p50)}, p99 {ms(p99)}; {CHUNKS / p50:,.0f} chunks/s"
    if cpu:
        data["agent_cpu_p50_s"] = percentile(cpu, 50)
        measured += f"; agent CPU p50 {ms(data['agent_cpu_p50_s'])}"
    return Figure(
        name,
        f"{CHUNKS} chunks (256k tokens, 125 MiB of fp16), {rounds} rounds, agents in their own processes",
        measured,
        "-" if target_s is None else f"p50 <= {ms(target_s)}",
        None if target_s is None else p50 <= target_s,
        data=data,
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
            ) as first,
            agents(
                server.url,
                INSTANCES[1:],
                scratch,
                extra_config=lambda i: {"p2p_host": "127.0.0.1", "p2p_init_ports": peers[i]},
            ) as second,
            httpx.Client(timeout=60) as client,
        ):
            _wait_held(client, ctl.url)
            note(f"{rounds} rounds of pin/unpin, move there and back, compress/decompress over {CHUNKS} chunks")
            pins, unpins, moves = [], [], []
            pids = dict(zip(INSTANCES, (first[0].pid, second[0].pid), strict=True))
            there: dict[str, list[tuple[float, float]]] = {method: [] for method in METHODS}
            back: dict[str, list[tuple[float, float]]] = {method: [] for method in METHODS}
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
                for method in METHODS:
                    body = {"instance_id": holder, "location": CPU, "method": method}
                    there[method].append(_cpu_post(client, f"{ctl.url}/compress", body, len(TOKENS), pids[holder]))
                    back[method].append(_cpu_post(client, f"{ctl.url}/decompress", body, len(TOKENS), pids[holder]))
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
        *(
            figure
            for method in METHODS
            for figure in (
                _figure(
                    f"/compress {method}",
                    [wall for wall, _ in there[method]],
                    rounds,
                    [cpu for _, cpu in there[method]],
                    LOSSLESS_TARGET_S if method == "zstd" else None,
                ),
                _figure(
                    f"/decompress {method}",
                    [wall for wall, _ in back[method]],
                    rounds,
                    [cpu for _, cpu in back[method]],
                ),
            )
        ),
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
