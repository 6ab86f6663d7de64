"""A fleet whose instances live on different masters of the shared Redis Cluster: lookups across them,
clears, pins, a move between masters, tensor-parallel fan-out, the reaper, /check_finish on another
replica and the reference engine. Agents run on threads in process; controllers are apps in process.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from starlette.testclient import TestClient

from kvbus.agent.agent import Agent
from kvbus.agent.synthetic import synthetic_kv
from kvbus.controller.app import create_app
from kvbus.shared import keys
from kvbus.shared.config import KVBusConfig
from kvbus.shared.locations import Location
from tests.cluster.conftest import ids_on_masters
from tests.conftest import MODEL, SEED_TEXT, SEED_TOKENS, Processes, RedisClusterServers, free_port, wait_for
from tests.controller.conftest import CheckedClient

PROMPT = list(range(1000, 1600))  # chunks of 256, 256 and 88 tokens
CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
BASE = KVBusConfig(enable_controller=True, command_timeout=2.0, heartbeat_interval=0.1, heartbeat_ttl=30)


@pytest.fixture
def config(cluster_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=cluster_url)


@pytest.fixture
def ids(redis_cluster: RedisClusterServers) -> list[str]:
    """One instance id per master: their keys (one hash tag each) land on three different masters."""
    chosen = ids_on_masters(redis_cluster, "fleet")
    assert len({redis_cluster.master_of(keys.alive(i)) for i in chosen}) == 3
    return chosen


@pytest.fixture
def client(config: KVBusConfig) -> Iterator[TestClient]:
    with CheckedClient(create_app(config)) as test_client:
        yield test_client


@pytest.fixture
def replica(config: KVBusConfig) -> Iterator[TestClient]:
    """A second controller replica on the same cluster."""
    with CheckedClient(create_app(config)) as test_client:
        yield test_client


def post(client: TestClient, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == status, (path, response.text)
    return response.json()  # type: ignore[no-any-return]


def layout(client: TestClient, tokens: list[int] = PROMPT) -> dict[str, list[Any]]:
    return post(client, "/lookup", {"tokens": tokens})["layout_info"]  # type: ignore[no-any-return]


def store(agent: Agent, tokens: list[int], location: str = CPU) -> None:
    backend = next(b for b in agent.backends if b.location == location)
    backend.store(tokens, synthetic_kv(agent.space, tokens))
    agent.index.flush()


class Fleet:
    """Agents started by a test, stopped at its end."""

    def __init__(self, config: KVBusConfig, tmp_path: Path) -> None:
        self.config = config
        self.tmp = tmp_path
        self.agents: list[Agent] = []

    def start(self, instance_id: str, *, worker_id: int = 0, peer: bool = False, disk: bool = False) -> Agent:
        overrides: dict[str, Any] = {"lmcache_instance_id": instance_id}
        if peer:
            overrides |= {"p2p_host": "127.0.0.1", "p2p_init_ports": (free_port(),)}
        if disk:
            overrides |= {"local_disk": str(self.tmp / "disk"), "max_local_disk_size": 1}
        agent = Agent(self.config.with_overrides(**overrides), model=MODEL, worker_id=worker_id)
        agent.start()
        self.agents.append(agent)
        return agent

    def stop(self) -> None:
        """Each agent waits up to a blocking read (1 s) for its command thread: they stop side by side."""
        stopping = [threading.Thread(target=agent.stop) for agent in self.agents]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join(30)


@pytest.fixture
def fleet(config: KVBusConfig, tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(config, tmp_path)
    yield running
    running.stop()


@pytest.fixture
def holders(fleet: Fleet, ids: list[str]) -> dict[str, Agent]:
    """full (600 tokens in memory), half (512), disked (256 in memory, 600 on disk) on the three masters, and
    holed (chunks 0 and 2, not 1) on any of them."""
    full, half, disked = ids
    agents = {
        "full": fleet.start(full, peer=True),
        "half": fleet.start(half, peer=True),
        "disked": fleet.start(disked, disk=True),
        "holed": fleet.start("holed"),
    }
    store(agents["full"], PROMPT)
    store(agents["half"], PROMPT[:512])
    store(agents["disked"], PROMPT[:256])
    store(agents["disked"], PROMPT, DISK)
    store(agents["holed"], PROMPT)
    agents["holed"].backends[0].discard(agents["holed"].space.chunks(PROMPT)[1].key)
    agents["holed"].index.flush()
    return agents


def test_a_lookup_names_every_holder_across_masters_with_its_own_match(
    client: TestClient, holders: dict[str, Agent], redis_cluster: RedisClusterServers
) -> None:
    full, half, disked = (holders[n].instance_id for n in ("full", "half", "disked"))
    answer = layout(client)
    assert answer == {full: [CPU, 600], disked: [DISK, 600], half: [CPU, 512], "holed": [CPU, 256]}
    assert [match for _, match in answer.values()] == sorted((m for _, m in answer.values()), reverse=True)
    two = {full: [CPU, 512], disked: [DISK, 512], half: [CPU, 512], "holed": [CPU, 256]}
    assert layout(client, PROMPT[:512]) == two
    # A prompt's partial last chunk is its own chunk: 300 tokens match 256 wherever 512 are held.
    assert layout(client, PROMPT[:300]) == {instance: [CPU, 256] for instance in (full, disked, half, "holed")}
    assert layout(client, [7, 8, 9]) == {}
    # Each instance's index sits on the master that serves its hash tag, and on no other.
    for agent in holders.values():
        owner = redis_cluster.master_of(keys.alive(agent.instance_id))
        with redis.Redis(port=owner) as node:
            assert node.hlen(keys.index(agent.instance_id, 0, Location.CPU)) > 0


def test_clears_on_each_master_free_what_that_instance_held(client: TestClient, holders: dict[str, Agent]) -> None:
    full, half, disked = (holders[n].instance_id for n in ("full", "half", "disked"))
    assert post(client, "/clear", {"instance_id": full, "location": CPU})["num_tokens"] == 600
    assert full not in layout(client) and half in layout(client)
    assert post(client, "/clear", {"instance_id": half, "location": CPU})["num_tokens"] == 512
    assert post(client, "/clear", {"instance_id": "holed", "location": CPU})["num_tokens"] == 256 + 88
    assert post(client, "/clear", {"instance_id": disked, "location": CPU})["num_tokens"] == 256
    assert layout(client) == {disked: [DISK, 600]}
    assert post(client, "/clear", {"instance_id": disked, "location": DISK})["num_tokens"] == 600
    assert layout(client) == {}
    assert all(agent.tiers.contains(PROMPT) == 0 for agent in holders.values())


def test_pinned_chunks_survive_a_clear_until_unpinned(client: TestClient, holders: dict[str, Agent]) -> None:
    half = holders["half"].instance_id
    target = {"instance_id": half, "location": CPU}
    assert post(client, "/pin", {**target, "tokens": PROMPT})["num_tokens"] == 512
    assert post(client, "/clear", target)["num_tokens"] == 0
    assert layout(client)[half] == [CPU, 512]
    assert post(client, "/unpin", {**target, "tokens": PROMPT})["num_tokens"] == 512
    assert post(client, "/clear", target)["num_tokens"] == 512
    assert half not in layout(client)


def test_a_move_between_instances_on_different_masters(
    client: TestClient, holders: dict[str, Agent], redis_cluster: RedisClusterServers
) -> None:
    source, dest = holders["full"], holders["half"]
    assert redis_cluster.master_of(keys.alive(source.instance_id)) != redis_cluster.master_of(
        keys.alive(dest.instance_id)
    )
    before = [t.clone() for t in source.tiers.retrieve(PROMPT)]
    body = {"old_position": [source.instance_id, CPU], "new_position": [dest.instance_id, CPU], "tokens": PROMPT}
    moved = post(client, "/move", {**body, "should_copy": False})
    assert moved["num_tokens"] == 600
    answer = layout(client)
    assert answer[dest.instance_id] == [CPU, 600] and source.instance_id not in answer
    assert all(torch.equal(a, b) for a, b in zip(before, dest.tiers.retrieve(PROMPT), strict=True))
    assert post(client, "/check_finish", {"event_id": moved["event_id"]})["status"] == "finished"


def test_a_tensor_parallel_instance_answers_with_every_rank(client: TestClient, fleet: Fleet) -> None:
    ranks = [fleet.start("tp-fleet", worker_id=rank) for rank in (0, 1)]
    store(ranks[0], PROMPT)
    store(ranks[1], PROMPT[:256])
    assert layout(client) == {"tp-fleet": [CPU, 256]}  # only what every rank holds
    health = post(client, "/health", {"instance_id": "tp-fleet"})
    assert health["error_codes"] == {"0": 0, "1": 0}
    cleared = post(client, "/clear", {"instance_id": "tp-fleet", "location": CPU})
    assert cleared["num_tokens"] == 256 and cleared["num_tokens_per_worker"] == {"0": 600, "1": 256}
    assert layout(client) == {}


def test_check_finish_on_another_replica_tells_each_command_s_outcome(
    client: TestClient, replica: TestClient, holders: dict[str, Agent], config: KVBusConfig
) -> None:
    full = holders["full"].instance_id
    cleared = post(client, "/clear", {"instance_id": full, "location": CPU})
    told = post(replica, "/check_finish", {"event_id": cleared["event_id"]})
    assert told["status"] == "finished" and told["kind"] == "clear" and told["instance_id"] == full
    assert told["workers"]["0"]["num_tokens"] == 600
    # A command no agent reads: a 504 from the first replica, "expired" from the second after its deadline.
    silent = Agent(config.with_overrides(lmcache_instance_id="silent-fleet"), model=MODEL)
    silent.registration.register()
    silent.consumer.ensure_group()
    try:
        timed_out = post(client, "/clear", {"instance_id": "silent-fleet", "location": CPU}, status=504)
        wait_for(
            lambda: post(replica, "/check_finish", {"event_id": timed_out["event_id"]})["status"] == "expired",
            timeout=10,
            what="the unanswered command to be told expired",
        )
    finally:
        silent.registration.deregister()


def test_the_reaper_removes_a_killed_instance_from_its_master(
    procs: Processes, cluster_url: str, redis_cluster: RedisClusterServers, fleet: Fleet
) -> None:
    doomed = ids_on_masters(redis_cluster, "doomed", 1)[0]
    fleet.start("survivor")
    store(fleet.agents[0], PROMPT)
    agent = procs.agent(cluster_url, doomed, "--preload-tokens", ",".join(map(str, PROMPT)))
    config = BASE.with_overrides(redis_url=cluster_url, reap_after=1.0)
    with CheckedClient(create_app(config)) as client:
        wait_for(lambda: doomed in layout(client), what="the doomed instance's index")
        os.kill(agent.pid, signal.SIGKILL)  # no deregistration: only the reaper removes it
        agent.wait(10)
        owner = redis_cluster.master_of(keys.alive(doomed))
        with redis.Redis(port=owner, decode_responses=True) as node:
            wait_for(lambda: not list(node.scan_iter(f"kvbus:{{{doomed}}}:*")), timeout=20, what="the reaper")
        cluster = redis_cluster.client()
        try:
            assert doomed not in cluster.smembers(keys.INSTANCES)
            head = keys.head(Location.CPU, fleet.agents[0].space.chunks(PROMPT)[0].key)
            assert cluster.smembers(head) == {keys.head_member("survivor", 0)}
        finally:
            cluster.close()
        assert layout(client) == {"survivor": [CPU, 600]}
        assert post(client, "/clear", {"instance_id": doomed, "location": CPU}, status=404)["error"] == (
            "unknown_instance"
        )


def test_the_reference_engine_on_a_cluster(procs: Processes, cluster_url: str, client: TestClient) -> None:
    _, engine = procs.engine(cluster_url, "engine-on-cluster")
    completion = httpx.post(
        f"{engine}/v1/completions", json={"model": MODEL, "prompt": SEED_TEXT, "max_tokens": 4}, timeout=60
    )
    assert completion.status_code == 200, completion.text
    assert layout(client, SEED_TOKENS) == {"engine-on-cluster": [CPU, 12]}
    assert post(client, "/clear", {"instance_id": "engine-on-cluster", "location": CPU})["num_tokens"] == 12
    assert layout(client, SEED_TOKENS) == {}
