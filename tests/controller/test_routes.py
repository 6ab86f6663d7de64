"""The command-kind endpoints and the queries routes.py serves, in process against real redis-server and
real agents on threads: pin and unpin, compress and decompress, move, health, the worker queries and key stats.

The bus's fan-out and /check_finish have their own modules (test_bus.py, test_command_records.py), which
use this module's instance, prompt and helpers.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from starlette.testclient import TestClient

from kvbus.agent import peer
from kvbus.agent.agent import Agent
from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.codecs import scale_dims
from kvbus.agent.synthetic import synthetic_kv
from kvbus.controller import routes
from kvbus.shared import keys, redis_conn
from kvbus.shared.config import KVBusConfig
from kvbus.shared.flat_fields import decode
from kvbus.shared.messages import TICKET_BYTES, Command, CommandKind
from tests.conftest import MODEL, free_port

# One suite for both deployments: each test runs on one Redis and on a 3-master Redis Cluster.
REDIS_BACKENDS = ("single", "cluster")

INSTANCE = "tp-instance"
PROMPT = list(range(1000, 1600))  # chunks of 256, 256 and 88
BASE = KVBusConfig(
    enable_controller=True, command_timeout=0.5, heartbeat_interval=0.1, heartbeat_ttl=30, lmcache_instance_id=INSTANCE
)
CPU = {"instance_id": INSTANCE, "location": "LocalCPUBackend"}


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


def post(client: TestClient, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()  # type: ignore[no-any-return]


def store(agent: Agent, tokens: list[int]) -> None:
    """Store `tokens` as the engine would, and index them before the test goes on."""
    agent.tiers.store(tokens, synthetic_kv(agent.space, tokens))
    agent.index.flush()


@pytest.fixture
def single(agent: Agent) -> Agent:
    """One worker holding PROMPT in CPU memory."""
    store(agent, PROMPT)
    return agent


def test_health_reports_each_rank(client: TestClient, ranks: list[Agent]) -> None:
    answer = post(client, "/health", {"instance_id": INSTANCE})
    assert answer["error_codes"] == {"0": 0, "1": 0} and answer["event_id"].startswith("health")
    assert post(client, "/check_finish", {"event_id": answer["event_id"]})["status"] == "finished"


def test_health_of_unknown_silent_and_malformed(client: TestClient, silent: Agent) -> None:
    assert post(client, "/health", {"instance_id": "ghost"}, status=404)["error"] == "unknown_instance"
    assert post(client, "/health", {}, status=422)["field"] == "instance_id"
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
    # As LMCache: an unknown instance or worker is left out, and an empty list means every worker.
    assert post(client, "/query_worker_info", {"instance_id": "ghost", "worker_ids": []})["worker_infos"] == []
    assert post(client, "/query_worker_info", {"instance_id": INSTANCE, "worker_ids": [7]})["worker_infos"] == []
    assert len(post(client, "/query_worker_info", {"instance_id": INSTANCE, "worker_ids": []})["worker_infos"]) == 2
    assert post(client, "/query_worker_info", {"worker_ids": [0]}, status=422)["field"] == "instance_id"


def test_query_instance_finds_the_instance_at_an_ip(client: TestClient, ranks: list[Agent]) -> None:
    found = post(client, "/query_instance", {"event_id": "x", "ip": "127.0.0.1"})
    assert found["res"] == INSTANCE and found["event_id"].startswith("QueryInst")  # LMCache's own id
    assert post(client, "/query_instance", {"event_id": "x", "ip": "10.9.9.9"})["res"] is None
    assert post(client, "/query_instance", {"ip": "10.9.9.9"}, status=422)["field"] == "event_id"  # required
    assert post(client, "/query_instance", {}, status=422)["field"] == "event_id"


def test_key_stats_and_workers(client: TestClient, ranks: list[Agent]) -> None:
    store(ranks[0], PROMPT)
    stats = client.get("/controller/key-stats").json()
    assert stats == {
        "total_key_count": 3,
        "total_instance_count": 1,
        "total_worker_count": 2,
        "instances": [{"instance_id": INSTANCE, "key_count": 3, "worker_count": 2}],
    }
    listed = client.get("/controller/workers").json()
    assert listed["total_count"] == 2
    # Each worker its own count, as LMCache: rank 0 stored the prompt, rank 1 nothing.
    assert [(w["worker_id"], w["key_count"]) for w in listed["workers"]] == [(0, 3), (1, 0)]
    one = client.get("/controller/workers", params={"instance_id": INSTANCE, "worker_id": 1}).json()
    assert one["worker_id"] == 1 and one["key_count"] == 0
    assert client.get("/controller/workers", params={"instance_id": INSTANCE, "worker_id": 5}).status_code == 404
    assert client.get("/controller/workers", params={"instance_id": "ghost"}).status_code == 404
    assert client.get("/controller/workers", params={"instance_id": INSTANCE, "worker_id": "x"}).status_code == 422
    # worker_id without instance_id: every worker, as LMCache answers
    assert client.get("/controller/workers", params={"worker_id": 0}).json()["total_count"] == 2


@pytest.fixture
def disked(config: KVBusConfig, tmp_path: Any) -> Iterator[Agent]:
    """One worker with CPU memory and a disk, holding PROMPT in both."""
    agent = Agent(config.with_overrides(local_disk=str(tmp_path / "disk"), max_local_disk_size=1), model=MODEL)
    agent.start()
    store(agent, PROMPT)
    yield agent
    agent.stop()


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
    assert post(client, path, {**CPU, "tokens": []})["num_tokens"] == 0  # as LMCache: nothing asked, nothing done
    assert post(client, path, {**CPU, "tokens": ["a"]}, status=422)["field"].startswith("tokens")
    assert post(client, path, {"instance_id": INSTANCE, "tokens": [1]}, status=422)["field"] == "location"
    assert (
        post(client, path, {"instance_id": "ghost", "location": "LocalCPUBackend", "tokens": [1]}, status=404)["error"]
        == "unknown_instance"
    )
    assert post(client, "/lookup", {"tokens": PROMPT})["layout_info"][INSTANCE] == ["LocalCPUBackend", 600]


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


def test_chunks_sent_to_a_peer_without_the_controller_are_refused_and_change_no_lookup(
    client: TestClient, pair: tuple[Agent, Agent]
) -> None:
    source, dest = pair
    url = dest.registration.address.peer_init_url
    assert url is not None and dest.peer is not None
    assert dest.peer.address == ("127.0.0.1", int(url.rpartition(":")[2]))  # p2p_host, and nowhere wider
    poison = list(range(5000, 5300))

    def send(ticket: str) -> None:
        kv = synthetic_kv(dest.space, poison)
        chunks = [IndexEntry(c.key, c.num_tokens, c.start == 0) for c in dest.space.chunks(poison)]
        with pytest.raises(peer.TransferFailed, match="no valid ticket"):
            peer.send(url, ticket, dest.space, "LocalCPUBackend", chunks, kv, 5)

    send(secrets.token_hex(TICKET_BYTES))
    assert post(client, "/lookup", {"tokens": poison})["layout_info"] == {}
    assert len(dest.backends[0]) == 0
    # A ticket read off the command stream is spent by the move it came with.
    assert move(client, ("src", "LocalCPUBackend"), ("dst", "LocalCPUBackend"), PROMPT[:256], copy=True)["num_tokens"]
    with redis_conn.connect(source.config.redis_url) as client_redis:
        (_, fields), *_ = client_redis.xrevrange(keys.commands("src"), count=1)
    sent = decode(Command, fields)
    assert sent.kind == CommandKind.MOVE and sent.tickets.keys() == {"0"}
    send(sent.tickets["0"])
    assert post(client, "/lookup", {"tokens": poison})["layout_info"] == {}
    assert post(client, "/lookup", {"tokens": PROMPT})["layout_info"]["dst"] == ["LocalCPUBackend", 256]


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
        == "old_position[1]"  # pydantic's: the missing item
    )
    assert (
        post(
            client,
            "/move",
            {"old_position": ["src", 5], "new_position": ["dst", "LocalCPUBackend"], "tokens": PROMPT},
            status=422,
        )["field"]
        == "old_position[1]"
    )
    nowhere = {"old_position": ["src", "Nowhere"], "new_position": ["dst", "LocalCPUBackend"], "tokens": PROMPT}
    assert post(client, "/move", nowhere)["num_tokens"] == 0  # a location the worker lacks holds nothing
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


def test_clear_of_a_location_the_agent_lacks_clears_nothing(client: TestClient, single: Agent) -> None:
    response = client.post("/clear", json={"instance_id": INSTANCE, "location": "LocalDiskBackend"})
    assert response.status_code == 200 and response.json()["num_tokens"] == 0


def test_an_oversized_body_is_413(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "MAX_BODY_BYTES", 64)
    response = client.post("/lookup", json={"tokens": list(range(100))})
    assert response.status_code == 413 and response.json()["error"] == "body_too_large"
