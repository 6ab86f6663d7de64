"""Helpers of the cluster tier: instance ids placed on chosen masters, moving a slot, and load from threads.

The tier runs kvbus against a 3-master Redis Cluster with a replica per master (tests/conftest.py's
RedisClusterServers). Tests that only read and write share the session's cluster (`cluster_url`);
tests that kill a master or move a slot start a cluster of their own (`own_cluster`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from kvbus.shared import keys
from tests.conftest import Processes, RedisClusterServers, wait_for

CPU = "LocalCPUBackend"

# Longer than any controller deadline (command_timeout, redis_timeout): a client timeout is a hang.
CLIENT_TIMEOUT_S = 20.0


def seed_url(cluster: RedisClusterServers) -> str:
    """Every node of `cluster` as a seed list, so that clients find it whichever node is down."""
    return "redis://" + ",".join(f"127.0.0.1:{port}" for port in cluster.nodes) + "/0"


def ids_on_masters(cluster: RedisClusterServers, prefix: str, count: int | None = None) -> list[str]:
    """`count` instance ids (default: one per master), each served by a different master now."""
    wanted = count or len(cluster.master_ports())
    found: dict[int, str] = {}
    for n in range(10_000):
        instance_id = f"{prefix}-{n}"
        found.setdefault(cluster.master_of(keys.alive(instance_id)), instance_id)
        if len(found) == wanted:
            return list(found.values())
    raise AssertionError(f"no {wanted} ids with prefix {prefix} on distinct masters")


def node_id(port: int) -> str:
    with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as client:
        return str(client.execute_command("CLUSTER", "MYID"))


def move_slot(cluster: RedisClusterServers, slot: int, to_port: int, batch: int = 2, pause_s: float = 0.05) -> int:
    """Reshard `slot` to the master on `to_port` as redis-cli --cluster reshard does, a few keys at a time
    (so that traffic meets the slot half moved); returns how many keys moved."""
    from_port = owner(cluster.live()[0].port, slot)
    assert from_port is not None and from_port != to_port, (from_port, to_port)
    source, target = node_id(from_port), node_id(to_port)
    moved = 0
    with (
        redis.Redis(port=from_port, decode_responses=True, socket_timeout=5) as src,
        redis.Redis(port=to_port, decode_responses=True, socket_timeout=5) as dst,
    ):
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target)
        while names := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
            src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "REPLACE", "KEYS", *names)
            moved += len(names)
            time.sleep(pause_s)
    # The new owner first, then the old one, then everyone else (as redis-cli does).
    for port in [to_port, from_port, *(p for p in cluster.master_ports() if p not in (to_port, from_port))]:
        with redis.Redis(port=port, socket_timeout=2) as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)
    wait_for(
        lambda: all(owner(node.port, slot) == to_port for node in cluster.live()) and cluster.healthy(),
        timeout=10,
        what=f"every node to see slot {slot} served by {to_port}",
    )
    return moved


def owner(port: int, slot: int) -> int | None:
    """The port of the master serving `slot`, as the node on `port` sees it."""
    with redis.Redis(port=port, decode_responses=True, socket_timeout=1) as client:
        nodes = str(client.execute_command("CLUSTER", "NODES"))
    for fields in (line.split() for line in nodes.splitlines()):
        if "master" not in fields[2] or "fail" in fields[2]:
            continue
        for served in fields[8:]:
            low, _, high = served.partition("-")
            if not served.startswith("[") and int(low) <= slot <= int(high or low):
                return int(fields[1].split("@")[0].rsplit(":", 1)[1])
    return None


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A cluster of this test's own, since the test kills or reshards its nodes; stopped whatever happens."""
    cluster = RedisClusterServers(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def post(base: str, path: str, body: dict[str, Any], status: int | None = 200) -> dict[str, Any]:
    response = httpx.post(f"{base}{path}", json=body, timeout=CLIENT_TIMEOUT_S)
    if status is not None:
        assert response.status_code == status, (path, body, response.status_code, response.text)
    return response.json()  # type: ignore[no-any-return]


def lookup(base: str, tokens: list[int]) -> dict[str, list[Any]]:
    return post(base, "/lookup", {"tokens": tokens})["layout_info"]  # type: ignore[no-any-return]


@dataclass
class Outcome:
    path: str
    body: dict[str, Any]
    started: float
    elapsed: float
    status: int | None = None
    answer: dict[str, Any] | None = None
    error: str | None = None  # the client's own failure: a timeout or a dropped connection


@dataclass
class Load:
    """Threads sending `requests` round-robin to a controller until stopped, every outcome kept."""

    base: str
    requests: list[tuple[str, dict[str, Any]]]
    threads: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for n in range(self.threads):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._workers:
            thread.join(CLIENT_TIMEOUT_S + 5)
        return list(self.outcomes)

    def _run(self, n: int) -> None:
        with httpx.Client(base_url=self.base, timeout=CLIENT_TIMEOUT_S) as client:
            i = n
            while not self._stop.is_set():
                path, body = self.requests[i % len(self.requests)]
                i += 1
                started = time.monotonic()
                outcome = Outcome(path, body, started, 0.0)
                try:
                    response = client.post(path, json=body)
                    outcome.status = response.status_code
                    outcome.answer = response.json()
                except (httpx.HTTPError, ValueError) as exc:
                    outcome.error = f"{type(exc).__name__}: {exc}"
                outcome.elapsed = time.monotonic() - started
                with self._lock:
                    self.outcomes.append(outcome)
                time.sleep(0.01)


def check_answered(outcomes: list[Outcome]) -> None:
    """Every request got an answer: a 200, or a JSON 503/504 naming its error; never a hang or a 500."""
    assert outcomes, "no request was sent"
    failures = [o for o in outcomes if o.error is not None]
    assert not failures, [(o.path, o.error, round(o.elapsed, 2)) for o in failures[:5]]
    unexpected = [o for o in outcomes if o.status not in (200, 503, 504)]
    assert not unexpected, [(o.path, o.status, o.answer) for o in unexpected[:5]]
    for o in outcomes:
        if o.status != 200:
            assert o.answer is not None and o.answer.get("error") in ("redis_unavailable", "agent_timeout"), o.answer


def command_events(outcomes: list[Outcome]) -> list[tuple[Outcome, str]]:
    """The commands among `outcomes` that carry an event id (sent, or maybe sent)."""
    return [
        (o, str(o.answer["event_id"]))
        for o in outcomes
        if o.path != "/lookup" and o.answer is not None and "event_id" in o.answer
    ]


def prompts(n: int) -> tuple[list[int], list[int]]:
    """Instance n's two prompts: one it pins (600 tokens, 3 chunks), one that clears free (300 tokens, 2 chunks)."""
    return list(range(20_000 + 1000 * n, 20_600 + 1000 * n)), list(range(60_000 + 1000 * n, 60_300 + 1000 * n))


def busy_fleet(procs: Processes, url: str, base: str, ids: list[str]) -> dict[str, tuple[list[int], list[int]]]:
    """An agent process for each of `ids`, holding its two prompts, the first pinned; what each holds."""
    held = {instance_id: prompts(n) for n, instance_id in enumerate(ids)}
    for instance_id, (pinned, loose) in held.items():
        procs.agent(url, instance_id, *(f"--preload-tokens={','.join(map(str, p))}" for p in (pinned, loose)))
    for instance_id, (pinned, loose) in held.items():
        wait_for(lambda i=instance_id, p=loose: i in lookup(base, p), what=f"{instance_id}'s preloaded prompts")
        target = {"instance_id": instance_id, "location": CPU}
        assert post(base, "/pin", {**target, "tokens": pinned})["num_tokens"] == 600
    return held


def mixed_requests(held: dict[str, tuple[list[int], list[int]]]) -> list[tuple[str, dict[str, Any]]]:
    """Lookups of both prompts of each instance, and a clear of each (which frees its loose prompt only)."""
    requests: list[tuple[str, dict[str, Any]]] = []
    for instance_id, (pinned, loose) in held.items():
        requests += [("/lookup", {"tokens": pinned}), ("/lookup", {"tokens": loose})]
        requests.append(("/clear", {"instance_id": instance_id, "location": CPU}))
    return requests


def check_index(base: str, held: dict[str, tuple[list[int], list[int]]]) -> bool:
    """Whether the index is what the fleet holds now: each pinned prompt whole at its instance, no loose one."""
    return all(
        lookup(base, pinned) == {instance_id: [CPU, 600]} and lookup(base, loose) == {}
        for instance_id, (pinned, loose) in held.items()
    )


def summary(outcomes: list[Outcome]) -> str:
    by_status: dict[str, int] = {}
    for o in outcomes:
        name = f"{o.path} {o.status}"
        by_status[name] = by_status.get(name, 0) + 1
    slowest = max(o.elapsed for o in outcomes)
    return f"{len(outcomes)} requests {dict(sorted(by_status.items()))}, slowest {slowest:.2f} s"
