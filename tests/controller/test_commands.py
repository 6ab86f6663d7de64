"""Every command endpoint and query in process, against real redis-server and real agents on threads:
tensor-parallel fan-out, the event table (/check_finish), the journal, health and the worker queries."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import torch
from starlette.testclient import TestClient

from kvbus.agent.agent import Agent
from kvbus.agent.codecs import scale_dims
from kvbus.agent.synthetic import synthetic_kv
from kvbus.shared import keys
from kvbus.shared.config import KVBusConfig
from tests.conftest import MODEL, SEED_TOKENS, free_port, wait_for

INSTANCE = "tp-instance"
PROMPT = list(range(1000, 1600))  # chunks of 256, 256 and 88
BASE = KVBusConfig(
    enable_controller=True, command_timeout=0.5, heartbeat_interval=0.1, heartbeat_ttl=30, lmcache_instance_id=INSTANCE
)


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


@pytest.fixture
def ranks(config: KVBusConfig) -> Iterator[list[Agent]]:
    """Two workers (tensor-parallel ranks) of one instance, each with its own agent."""
    agents = [Agent(config, model=MODEL, worker_id=rank) for rank in (0, 1)]
    for agent in agents:
        agent.start()
    yield agents
    for agent in agents:
        agent.stop()


def post(client: TestClient, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()  # type: ignore[no-any-return]


def hold(agent: Agent, tokens: list[int]) -> None:
    agent.tiers.store(tokens, synthetic_kv(agent.space, tokens))
    agent.index.flush()


def test_a_clear_reaches_every_rank_and_reports_their_disagreement(client: TestClient, ranks: list[Agent]) -> None:
    hold(ranks[0], PROMPT)
    hold(ranks[1], PROMPT[:512])
    answer = post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"})
    assert answer["num_tokens"] == 512
    assert answer["num_tokens_per_worker"] == {"0": 600, "1": 512}
    assert ranks[0].tiers.contains(PROMPT) == 0 and ranks[1].tiers.contains(PROMPT) == 0
    finished = post(client, "/check_finish", {"event_id": answer["event_id"]})
    assert finished["status"] == "finished" and finished["kind"] == "clear" and finished["instance_id"] == INSTANCE
    assert {w: r["num_tokens"] for w, r in finished["workers"].items()} == {"0": 600, "1": 512}


def test_ranks_that_agree_answer_exactly_as_lmcache(client: TestClient, ranks: list[Agent]) -> None:
    for agent in ranks:
        hold(agent, SEED_TOKENS)
    assert post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"}).keys() == {
        "event_id",
        "num_tokens",
    }


def test_a_silent_rank_gives_504_naming_it_and_check_finish_tells_the_outcome_later(
    client: TestClient, config: KVBusConfig
) -> None:
    live = Agent(config, model=MODEL, worker_id=0)
    live.start()
    late = Agent(config, model=MODEL, worker_id=1)
    late.registration.register()
    late.consumer.ensure_group()
    try:
        body = post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"}, status=504)
        assert body["error"] == "agent_timeout" and "worker 1 of 'tp-instance' did not answer" in body["detail"]
        assert "workers [0] answered" in body["detail"]
        event_id = body["event_id"]
        pending = post(client, "/check_finish", {"event_id": event_id})
        assert pending["status"] == "pending" and pending["workers"]["1"] == {"status": "pending"}
        assert pending["workers"]["0"]["status"] == "ok"
        late.start()  # reads the command past its deadline: answers it expired, does nothing
        wait_for(
            lambda: post(client, "/check_finish", {"event_id": event_id})["workers"]["1"]["status"] == "expired",
            what="the late rank's answer",
        )
        assert post(client, "/check_finish", {"event_id": event_id})["status"] == "expired"
    finally:
        live.stop()
        late.stop()


def test_check_finish_of_unknown_lookup_and_malformed_events(client: TestClient) -> None:
    missing = post(client, "/check_finish", {"event_id": "Clear-nothing"}, status=404)
    assert missing["error"] == "unknown_event" and missing["event_id"] == "Clear-nothing"
    looked = post(client, "/lookup", {"tokens": SEED_TOKENS})
    assert post(client, "/check_finish", {"event_id": looked["event_id"]})["status"] == "finished"
    assert post(client, "/check_finish", {}, status=422)["field"] == "event_id"
    assert post(client, "/check_finish", {"event_id": 7}, status=422)["field"] == "event_id"


def test_commands_and_results_are_journaled(client: TestClient, ranks: list[Agent], redis_url: str) -> None:
    event_id = post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"})["event_id"]
    journal = redis.Redis.from_url(redis_url, decode_responses=True).xrange(keys.JOURNAL)
    mine = [fields for _, fields in journal if fields.get("event_id") == event_id]
    assert [f["type"] for f in mine] == ["command", "result", "result"]
    assert mine[0]["instance_id"] == INSTANCE and mine[0]["kind"] == "clear"
    assert sorted(f["worker_id"] for f in mine[1:]) == ["0", "1"]


def test_health_reports_each_rank(client: TestClient, ranks: list[Agent]) -> None:
    answer = post(client, "/health", {"instance_id": INSTANCE})
    assert answer["error_codes"] == {"0": 0, "1": 0} and answer["event_id"].startswith("health")
    assert post(client, "/check_finish", {"event_id": answer["event_id"]})["status"] == "finished"


def test_health_of_unknown_silent_and_malformed(client: TestClient, redis_url: str, config: KVBusConfig) -> None:
    assert post(client, "/health", {"instance_id": "ghost"}, status=404)["error"] == "unknown_instance"
    assert post(client, "/health", {}, status=422)["field"] == "instance_id"
    silent = Agent(config, model=MODEL, worker_id=0)
    silent.registration.register()
    silent.consumer.ensure_group()
    body = post(client, "/health", {"instance_id": INSTANCE}, status=504)
    assert body["event_id"].startswith("health")


def test_query_worker_info_is_never_stale(client: TestClient, ranks: list[Agent]) -> None:
    every = post(client, "/query_worker_info", {"instance_id": "all", "worker_ids": None})
    assert [(w["instance_id"], w["worker_id"]) for w in every["worker_infos"]] == [(INSTANCE, 0), (INSTANCE, 1)]
    info = every["worker_infos"][0]
    assert {"ip", "port", "peer_init_url", "registration_time", "last_heartbeat_time"} <= info.keys()
    assert time.time() - info["last_heartbeat_time"] < 10
    one = post(client, "/query_worker_info", {"instance_id": INSTANCE, "worker_ids": [1]})
    assert [w["worker_id"] for w in one["worker_infos"]] == [1]
    assert post(client, "/query_worker_info", {"instance_id": "ghost", "worker_ids": []}, status=404)["error"] == (
        "unknown_instance"
    )
    assert post(client, "/query_worker_info", {"worker_ids": [0]}, status=422)["field"] == "instance_id"


def test_query_instance_finds_the_instance_at_an_ip(client: TestClient, ranks: list[Agent]) -> None:
    found = post(client, "/query_instance", {"event_id": "x", "ip": "127.0.0.1"})
    assert found == {"event_id": "x", "res": INSTANCE}
    assert post(client, "/query_instance", {"ip": "10.9.9.9"})["res"] is None
    assert post(client, "/query_instance", {}, status=422)["field"] == "ip"


def test_key_stats_and_workers(client: TestClient, ranks: list[Agent]) -> None:
    hold(ranks[0], PROMPT)
    stats = client.get("/controller/key-stats").json()
    assert stats == {
        "total_key_count": 3,
        "total_instance_count": 1,
        "total_worker_count": 2,
        "instances": [{"instance_id": INSTANCE, "key_count": 3, "worker_count": 2}],
    }
    listed = client.get("/controller/workers").json()
    assert listed["total_count"] == 2 and [w["worker_id"] for w in listed["workers"]] == [0, 1]
    one = client.get("/controller/workers", params={"instance_id": INSTANCE, "worker_id": 1}).json()
    assert one["worker_id"] == 1 and one["key_count"] == 3
    assert client.get("/controller/workers", params={"instance_id": INSTANCE, "worker_id": 5}).status_code == 404
    assert client.get("/controller/workers", params={"instance_id": "ghost"}).status_code == 404
    assert client.get("/controller/workers", params={"instance_id": INSTANCE, "worker_id": "x"}).status_code == 422
    assert client.get("/controller/workers", params={"worker_id": 0}).status_code == 422


def test_a_rank_that_stops_leaves_the_instance_to_the_others(client: TestClient, config: KVBusConfig) -> None:
    first, second = (Agent(config, model=MODEL, worker_id=rank) for rank in (0, 1))
    first.start()
    second.start()
    hold(first, SEED_TOKENS)
    second.stop()
    assert post(client, "/lookup", {"tokens": SEED_TOKENS})["layout_info"] == {INSTANCE: ["LocalCPUBackend", 12]}
    answer = post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"})
    assert answer == {"event_id": answer["event_id"], "num_tokens": 12}
    first.stop()
    assert post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"}, status=404)
    assert client.get("/controller/key-stats").json()["total_instance_count"] == 0


@pytest.fixture
def single(config: KVBusConfig) -> Iterator[Agent]:
    """One worker holding PROMPT in CPU memory."""
    agent = Agent(config, model=MODEL)
    agent.start()
    hold(agent, PROMPT)
    yield agent
    agent.stop()


@pytest.fixture
def disked(config: KVBusConfig, tmp_path: Any) -> Iterator[Agent]:
    """One worker with CPU memory and a disk, holding PROMPT in both."""
    agent = Agent(config.with_overrides(local_disk=str(tmp_path / "disk"), max_local_disk_size=1), model=MODEL)
    agent.start()
    hold(agent, PROMPT)
    yield agent
    agent.stop()


CPU = {"instance_id": INSTANCE, "location": "LocalCPUBackend"}


def test_pinned_chunks_survive_clear_until_unpinned(client: TestClient, single: Agent) -> None:
    pinned = post(client, "/pin", {**CPU, "tokens": PROMPT[:512]})
    assert pinned["num_tokens"] == 512 and pinned["event_id"].startswith("Pin")
    assert post(client, "/clear", CPU)["num_tokens"] == 88  # only the unpinned tail chunk
    assert post(client, "/lookup", {"tokens": PROMPT})["layout_info"][INSTANCE] == ["LocalCPUBackend", 512]
    assert post(client, "/unpin", {**CPU, "tokens": PROMPT[:512]})["num_tokens"] == 512
    assert post(client, "/clear", CPU)["num_tokens"] == 512
    assert post(client, "/pin", {**CPU, "tokens": PROMPT})["num_tokens"] == 0  # nothing held any more


def test_compressed_chunks_still_answer_lookups_and_serve_hits(client: TestClient, single: Agent) -> None:
    before = [t.clone() for t in single.tiers.retrieve(PROMPT)]
    used = single.backends[0].used_bytes
    squeezed = post(client, "/compress", {**CPU, "method": "int8", "tokens": PROMPT})
    assert squeezed["num_tokens"] == 600 and squeezed["event_id"].startswith("Compress")
    assert single.backends[0].used_bytes < used * 0.6  # fp16 to int8, plus one fp32 scale per channel
    assert post(client, "/lookup", {"tokens": PROMPT})["layout_info"][INSTANCE] == ["LocalCPUBackend", 600]
    after = single.tiers.retrieve(PROMPT)
    for original, restored in zip(before, after, strict=True):
        bound = original.float().abs().amax(dim=scale_dims(original.dim()), keepdim=True) / 254  # per channel
        assert restored.shape == original.shape and restored.dtype == original.dtype
        rounding = restored.float().abs() / 2048  # float16's own rounding of the restored value
        assert bool(((restored.float() - original.float()).abs() <= bound + rounding + 1e-7).all())
    assert post(client, "/decompress", {**CPU, "method": "int8", "tokens": []})["num_tokens"] == 600
    assert single.backends[0].used_bytes == used


def test_lossless_compression_is_exact(client: TestClient, single: Agent) -> None:
    before = [t.clone() for t in single.tiers.retrieve(PROMPT)]
    assert post(client, "/compress", {**CPU, "method": "zlib"})["num_tokens"] == 600
    assert all(a.equal(b) for a, b in zip(before, single.tiers.retrieve(PROMPT), strict=True))


def test_compression_errors(client: TestClient, disked: Agent) -> None:
    unknown = post(client, "/compress", {**CPU, "method": "magic", "tokens": []}, status=400)
    assert unknown["error"] == "unknown_method" and "int8" in unknown["detail"] and "zlib" in unknown["detail"]
    refused = post(
        client, "/compress", {"instance_id": INSTANCE, "location": "LocalDiskBackend", "method": "zlib"}, status=400
    )
    assert refused["error"] == "refused" and "LocalDiskBackend" in refused["detail"]
    assert post(client, "/check_finish", {"event_id": refused["event_id"]})["status"] == "failed"
    assert post(client, "/compress", {**CPU, "method": "int8", "tokens": [1, 2, 3]})["num_tokens"] == 0
    assert post(client, "/compress", {**CPU, "tokens": []}, status=422)["field"] == "method"
    assert (
        post(
            client, "/decompress", {"instance_id": "ghost", "location": "LocalCPUBackend", "method": "int8"}, status=404
        )["error"]
        == "unknown_instance"
    )


@pytest.mark.parametrize("path", ["/pin", "/unpin"])
def test_pin_errors(client: TestClient, single: Agent, path: str) -> None:
    assert post(client, path, {**CPU, "tokens": [5, 6, 7]})["num_tokens"] == 0  # not held
    assert post(client, path, {**CPU, "tokens": []}, status=422)["field"] == "tokens"
    assert post(client, path, {**CPU, "tokens": ["a"]}, status=422)["field"].startswith("tokens")
    assert post(client, path, {"instance_id": INSTANCE, "tokens": [1]}, status=422)["field"] == "location"
    assert (
        post(client, path, {"instance_id": "ghost", "location": "LocalCPUBackend", "tokens": [1]}, status=404)["error"]
        == "unknown_instance"
    )
    assert post(client, "/lookup", {"tokens": PROMPT})["layout_info"][INSTANCE] == ["LocalCPUBackend", 600]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/pin", {**CPU, "tokens": [1]}),
        ("/unpin", {**CPU, "tokens": [1]}),
        ("/compress", {**CPU, "method": "zlib"}),
        ("/decompress", {**CPU, "method": "zlib"}),
        (
            "/move",
            {
                "old_position": [INSTANCE, "LocalCPUBackend"],
                "new_position": [INSTANCE, "LocalDiskBackend"],
                "tokens": [1],
            },
        ),
        ("/health", {"instance_id": INSTANCE}),
        ("/clear", CPU),
    ],
)
def test_every_command_gives_504_on_a_silent_agent_then_check_finish_expires(
    client: TestClient, config: KVBusConfig, path: str, body: dict[str, Any]
) -> None:
    silent = Agent(config, model=MODEL)
    silent.registration.register()
    silent.consumer.ensure_group()
    answer = post(client, path, body, status=504)
    assert post(client, "/check_finish", {"event_id": answer["event_id"]})["status"] == "pending"
    wait_for(
        lambda: post(client, "/check_finish", {"event_id": answer["event_id"]})["status"] == "expired",
        timeout=10,
        what="the event to expire",
    )


@pytest.fixture
def pair(config: KVBusConfig, tmp_path: Any) -> Iterator[tuple[Agent, Agent]]:
    """Two instances with peer endpoints; the first holds PROMPT in memory and has a disk too."""
    source = Agent(
        config.with_overrides(
            lmcache_instance_id="src",
            p2p_host="127.0.0.1",
            p2p_init_ports=(free_port(),),
            local_disk=str(tmp_path / "src-disk"),
            max_local_disk_size=1,
        ),
        model=MODEL,
    )
    dest = Agent(
        config.with_overrides(lmcache_instance_id="dst", p2p_host="127.0.0.1", p2p_init_ports=(free_port(),)),
        model=MODEL,
    )
    for agent in (source, dest):
        agent.start()
    source.backends[0].store(PROMPT, synthetic_kv(source.space, PROMPT))
    source.index.flush()
    yield source, dest
    for agent in (source, dest):
        agent.stop()


def move(
    client: TestClient,
    old: tuple[str, str],
    new: tuple[str, str],
    tokens: list[int],
    copy: bool = False,
    status: int = 200,
) -> dict[str, Any]:
    return post(
        client,
        "/move",
        {"old_position": list(old), "new_position": list(new), "tokens": tokens, "should_copy": copy},
        status=status,
    )


def test_a_move_between_instances_carries_the_chunks_and_reindexes_them(
    client: TestClient, pair: tuple[Agent, Agent]
) -> None:
    source, dest = pair
    before = [t.clone() for t in source.backends[0].retrieve(PROMPT)]
    copied = move(client, ("src", "LocalCPUBackend"), ("dst", "LocalCPUBackend"), PROMPT[:512], copy=True)
    assert copied["num_tokens"] == 512 and copied["event_id"].startswith("Move")
    assert post(client, "/lookup", {"tokens": PROMPT})["layout_info"] == {
        "src": ["LocalCPUBackend", 600],
        "dst": ["LocalCPUBackend", 512],
    }
    moved = move(client, ("src", "LocalCPUBackend"), ("dst", "LocalCPUBackend"), PROMPT)
    assert moved["num_tokens"] == 600
    assert post(client, "/lookup", {"tokens": PROMPT})["layout_info"] == {"dst": ["LocalCPUBackend", 600]}
    assert all(torch.equal(a, b) for a, b in zip(before, dest.tiers.retrieve(PROMPT), strict=True))
    assert post(client, "/check_finish", {"event_id": moved["event_id"]})["status"] == "finished"


def test_a_move_within_an_instance_goes_to_its_disk(client: TestClient, pair: tuple[Agent, Agent]) -> None:
    assert move(client, ("src", "LocalCPUBackend"), ("src", "LocalDiskBackend"), PROMPT)["num_tokens"] == 600
    assert post(client, "/lookup", {"tokens": PROMPT})["layout_info"] == {"src": ["LocalDiskBackend", 600]}


def test_a_move_without_tokens_takes_every_chunk_as_lmcache_defaults(
    client: TestClient, pair: tuple[Agent, Agent]
) -> None:
    source, _ = pair
    other = list(range(9000, 9300))
    source.backends[0].store(other, synthetic_kv(source.space, other))
    source.index.flush()
    answer = post(
        client, "/move", {"old_position": ["src", "LocalCPUBackend"], "new_position": ["dst", "LocalCPUBackend"]}
    )
    assert answer["num_tokens"] == 900
    assert post(client, "/lookup", {"tokens": PROMPT})["layout_info"] == {"dst": ["LocalCPUBackend", 600]}
    assert post(client, "/lookup", {"tokens": other})["layout_info"] == {"dst": ["LocalCPUBackend", 300]}


def test_move_errors(client: TestClient, pair: tuple[Agent, Agent], ranks: list[Agent]) -> None:
    same = move(client, ("src", "LocalCPUBackend"), ("src", "LocalCPUBackend"), PROMPT, status=422)
    assert same["field"] == "new_position"
    assert move(client, ("ghost", "LocalCPUBackend"), ("dst", "LocalCPUBackend"), PROMPT, status=404)["error"] == (
        "unknown_instance"
    )
    assert move(client, ("src", "LocalCPUBackend"), ("ghost", "LocalCPUBackend"), PROMPT, status=404)["error"] == (
        "unknown_instance"
    )
    ranked = move(client, ("src", "LocalCPUBackend"), (INSTANCE, "LocalCPUBackend"), PROMPT, status=400)
    assert ranked["error"] == "refused" and "same number" in ranked["detail"]
    assert move(client, ("src", "LocalCPUBackend"), ("dst", "LocalCPUBackend"), [1, 2, 3])["num_tokens"] == 0
    assert (
        post(
            client,
            "/move",
            {"old_position": ["src"], "new_position": ["dst", "LocalCPUBackend"], "tokens": PROMPT},
            status=422,
        )["field"]
        == "old_position"
    )
    assert post(
        client,
        "/move",
        {"old_position": ["src", "Nowhere"], "new_position": ["dst", "LocalCPUBackend"], "tokens": PROMPT},
        status=422,
    )["field"].startswith("old_position")
    assert post(client, "/lookup", {"tokens": PROMPT})["layout_info"]["src"] == ["LocalCPUBackend", 600]


def test_a_move_to_an_instance_without_a_peer_endpoint_is_refused(
    client: TestClient, pair: tuple[Agent, Agent], config: KVBusConfig
) -> None:
    closed = Agent(config.with_overrides(lmcache_instance_id="closed"), model=MODEL)
    closed.start()
    try:
        refused = move(client, ("src", "LocalCPUBackend"), ("closed", "LocalCPUBackend"), PROMPT, status=400)
        assert refused["error"] == "refused" and "p2p_init_ports" in refused["detail"]
    finally:
        closed.stop()
