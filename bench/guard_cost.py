"""What the request guard costs on the hot paths, and what a command record costs in Redis.

Two controller processes on one Redis and one agent: one controller without an API token, one with
`KVBUS_API_TOKEN` set, so every request of the second carries `Authorization: Bearer` and is checked
(in constant time) before anything else. Both check the content type and the origin. The figure is
lookup and clear p50 of each, sequential over one keep-alive connection, in alternating rounds so
load on the box falls on both alike; and the Redis memory of a clear's command record
(MEMORY USAGE) once its one worker has answered.
"""

from __future__ import annotations

import secrets
import time

import httpx
import redis

from bench._harness import Figure, agent, controller, main, ms, note, percentile, redis_server, workdir
from kvbus.shared import keys
from kvbus.shared.locations import Location

INSTANCE = "bench-guard"
TOKENS = list(range(1000, 1600))


def _timed(client: httpx.Client, path: str, body: dict[str, object], count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.post(path, json=body)
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"{path} answered {response.status_code}: {response.text}")
    return latencies


def run(quick: bool) -> list[Figure]:
    rounds, per_round = (3, 100) if quick else (5, 400)
    token = secrets.token_urlsafe(32)
    clear = {"instance_id": INSTANCE, "location": str(Location.CPU)}
    samples: dict[tuple[str, str], list[float]] = {}
    with (
        workdir() as tmp,
        redis_server(tmp) as server,
        agent(server.url, INSTANCE, tmp),
        controller(server.url, tmp) as open_ctl,
        controller(server.url, tmp, env={"KVBUS_API_TOKEN": token}) as guarded_ctl,
    ):
        clients = {
            "without a token": httpx.Client(base_url=open_ctl.url, timeout=30),
            "with a token": httpx.Client(
                base_url=guarded_ctl.url, timeout=30, headers={"Authorization": f"Bearer {token}"}
            ),
        }
        note(f"guard_cost: {rounds} rounds of {per_round} lookups and clears on each controller")
        for _ in range(rounds):
            for label, client in clients.items():
                samples.setdefault(("/lookup", label), []).extend(
                    _timed(client, "/lookup", {"tokens": TOKENS}, per_round)
                )
                samples.setdefault(("/clear", label), []).extend(_timed(client, "/clear", clear, per_round))
        event_id = clients["with a token"].post("/clear", json=clear).json()["event_id"]
        record_bytes = redis.Redis.from_url(server.url).memory_usage(keys.command_record(event_id))
        for client in clients.values():
            client.close()
    figures = []
    for path in ("/lookup", "/clear"):
        plain, guarded = (percentile(samples[(path, label)], 50) for label in ("without a token", "with a token"))
        figures.append(
            Figure(
                f"{path} p50, API token checked",
                f"sequential, 1 keep-alive connection; {len(samples[(path, 'with a token')])} requests each",
                f"{ms(guarded)} with a token, {ms(plain)} without ({(guarded - plain) * 1e6:+.0f} us)",
                data={"p50_with_token_s": guarded, "p50_without_token_s": plain},
            )
        )
    figures.append(
        Figure(
            "Redis memory per command record",
            "a clear's record once its one worker answered (MEMORY USAGE)",
            f"{record_bytes} B",
            "<= 250 B",
            record_bytes is not None and record_bytes <= 250,
            {"bytes": float(record_bytes or 0)},
        )
    )
    return figures


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
