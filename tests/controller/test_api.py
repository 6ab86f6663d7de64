"""The controller app in-process, with agents on threads, against a real redis-server.

(fakeredis's asyncio client cannot cancel a blocked XREAD that a thread's write has
touched, which hangs the app's shutdown; real Redis has no such problem.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from starlette.testclient import TestClient

from kvbus.agent.agent import Agent
from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.index_writer import IndexWriter
from kvbus.agent.registration import Registration, WorkerAddress
from kvbus.agent.synthetic import synthetic_kv
from kvbus.controller import routes
from kvbus.controller.app import create_app
from kvbus.shared import keys
from kvbus.shared.config import KVBusConfig
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location
from tests.conftest import MODEL, SEED_TOKENS, RedisServer, free_port
from tests.controller.conftest import CheckedClient

BASE = KVBusConfig(
    enable_controller=True, command_timeout=0.5, heartbeat_interval=0.1, heartbeat_ttl=30, max_lookup_tokens=4096
)
SPACE = HashSpace(MODEL, 256)
PROMPT = list(range(1000, 2000))  # 3 full chunks and a 232-token tail


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


@pytest.fixture
def agent(config: KVBusConfig) -> Iterator[Agent]:
    running = Agent(config, model=MODEL)
    running.start()
    yield running
    running.stop()


def hold(
    url: str, instance_id: str, *prompts: list[int], space: HashSpace = SPACE, alive: bool = True
) -> LocalCPUBackend:
    """An instance that holds `prompts`, registered and indexed, with no consumer thread."""
    redis_client = redis.Redis.from_url(url, decode_responses=True)
    Registration(
        redis_client,
        instance_id=instance_id,
        worker_id=0,
        space=space,
        locations=[Location.CPU],
        address=WorkerAddress("127.0.0.1", None, None),
        ttl_s=60,
    ).register()
    writer = IndexWriter(redis_client, instance_id)
    backend = LocalCPUBackend(space, 1 << 30, writer)
    for prompt in prompts:
        backend.store(prompt, synthetic_kv(space, prompt))
    writer.flush()
    if not alive:
        redis_client.delete(keys.alive(instance_id))
    return backend


def lookup(client: TestClient, tokens: list[int]) -> dict[str, list[object]]:
    response = client.post("/lookup", json={"tokens": tokens})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["event_id"].startswith("Lookup")
    return body["layout_info"]  # type: ignore[no-any-return]


def test_the_seed_flow(client: TestClient, agent: Agent) -> None:
    assert lookup(client, SEED_TOKENS) == {}
    agent.tiers.store(SEED_TOKENS, synthetic_kv(agent.space, SEED_TOKENS))
    agent.index.flush()
    assert lookup(client, SEED_TOKENS) == {"lmcache_default_instance": ["LocalCPUBackend", 12]}
    response = client.post("/clear", json={"instance_id": "lmcache_default_instance", "location": "LocalCPUBackend"})
    assert response.status_code == 200
    assert response.json()["num_tokens"] == 12
    assert response.json()["event_id"].startswith("Clear")
    assert lookup(client, SEED_TOKENS) == {}
    assert agent.tiers.contains(SEED_TOKENS) == 0


def test_every_holder_is_credited_with_its_own_contiguous_prefix(
    client: TestClient,
    redis_url: str,
) -> None:
    hold(redis_url, "full", PROMPT)
    hold(redis_url, "half", PROMPT[:512])
    holed = hold(redis_url, "holed", PROMPT)
    holed.discard(SPACE.chunks(PROMPT)[1].key)
    holed.listener.flush()  # type: ignore[union-attr]
    hold(redis_url, "other", list(range(5000, 6000)))
    hold(redis_url, "dead", PROMPT, alive=False)
    hold(redis_url, "suffix-only", [7, 7, 7] + PROMPT[256:])
    layout = lookup(client, PROMPT)
    assert layout == {
        "full": ["LocalCPUBackend", 1000],
        "half": ["LocalCPUBackend", 512],
        "holed": ["LocalCPUBackend", 256],
    }
    assert list(layout) == ["full", "half", "holed"]  # longest first
    assert lookup(client, PROMPT[:300]) == {
        "full": ["LocalCPUBackend", 256],
        "half": ["LocalCPUBackend", 256],
        "holed": ["LocalCPUBackend", 256],
    }


def test_models_are_kept_apart_but_both_reported(client: TestClient, redis_url: str) -> None:
    hold(redis_url, "llama", SEED_TOKENS)
    hold(redis_url, "qwen", SEED_TOKENS[:8], space=HashSpace("Qwen/Qwen3-8B", 256))
    assert lookup(client, SEED_TOKENS) == {"llama": ["LocalCPUBackend", 12]}
    assert lookup(client, SEED_TOKENS[:8]) == {"qwen": ["LocalCPUBackend", 8]}


def test_clear_of_an_unknown_instance_is_404(client: TestClient) -> None:
    response = client.post("/clear", json={"instance_id": "ghost", "location": "LocalCPUBackend"})
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_instance"
    assert "ghost" in response.json()["detail"]


def test_clear_of_a_silent_instance_is_504_with_the_event_id(
    client: TestClient,
    redis_url: str,
) -> None:
    hold(redis_url, "silent", SEED_TOKENS)
    redis.Redis.from_url(redis_url).xgroup_create(keys.commands("silent"), "worker-0", mkstream=True)
    response = client.post("/clear", json={"instance_id": "silent", "location": "LocalCPUBackend"})
    assert response.status_code == 504
    body = response.json()
    assert body["error"] == "agent_timeout" and body["event_id"].startswith("Clear")
    assert "did not answer within 0.5 s" in body["detail"]


def test_clear_of_a_location_the_agent_lacks_clears_nothing(client: TestClient, agent: Agent) -> None:
    response = client.post("/clear", json={"instance_id": "lmcache_default_instance", "location": "LocalDiskBackend"})
    assert response.status_code == 200 and response.json()["num_tokens"] == 0


def test_an_agent_failure_is_502_with_the_event_id(
    client: TestClient,
    agent: Agent,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> int:
        raise OSError("device lost")

    monkeypatch.setattr(agent.backends[0], "clear", broken)
    response = client.post("/clear", json={"instance_id": "lmcache_default_instance", "location": "LocalCPUBackend"})
    assert response.status_code == 502
    assert response.json()["error"] == "agent_failed" and "OSError: device lost" in response.json()["detail"]
    assert response.json()["event_id"].startswith("Clear")


BAD_REQUESTS = [
    ("/lookup", b'{"tokens": [1, 2', 400, "malformed_body", None),
    ("/lookup", b"", 400, "malformed_body", None),
    ("/lookup", b"[1, 2]", 422, "invalid_field", ""),
    ("/lookup", b"{}", 422, "invalid_field", "tokens"),
    ("/lookup", b'{"tokens": "128000"}', 422, "invalid_field", "tokens"),
    ("/lookup", b'{"tokens": []}', 422, "invalid_field", "tokens"),
    ("/lookup", b'{"tokens": [1, -1]}', 422, "invalid_field", "tokens[1]"),
    ("/lookup", b'{"tokens": [1, 4294967296]}', 422, "invalid_field", "tokens[1]"),
    ("/lookup", b'{"tokens": [1, 2.5]}', 422, "invalid_field", "tokens[1]"),
    ("/lookup", b'{"tokens": [1, null]}', 422, "invalid_field", "tokens[1]"),
    ("/lookup", b'{"tokens": [' + b",".join([b"1"] * 4097) + b"]}", 422, "invalid_field", "tokens"),
    ("/clear", b'{"location": "LocalCPUBackend"}', 422, "invalid_field", "instance_id"),
    ("/clear", b'{"instance_id": "i"}', 422, "invalid_field", "location"),
    ("/clear", b'{"instance_id": "", "location": "LocalCPUBackend"}', 422, "invalid_field", "instance_id"),
    ("/clear", b'{"instance_id": 7, "location": "LocalCPUBackend"}', 422, "invalid_field", "instance_id"),
    ("/clear", b'{"instance_id": "i", "location": "GPU0"}', 422, "invalid_field", "location"),
    ("/clear", b"not json", 400, "malformed_body", None),
]


@pytest.mark.parametrize(("path", "body", "status", "error", "field"), BAD_REQUESTS)
def test_bad_input_gets_a_json_error_naming_the_field_and_loses_nothing(
    client: TestClient,
    redis_url: str,
    path: str,
    body: bytes,
    status: int,
    error: str,
    field: str | None,
) -> None:
    hold(redis_url, "keeper", SEED_TOKENS)
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.json()["detail"]
    if field is not None:
        assert response.json()["field"] == field
        assert field.split("[")[0] in response.json()["detail"] or field == ""
    assert lookup(client, SEED_TOKENS) == {"keeper": ["LocalCPUBackend", 12]}


def test_an_unknown_location_lists_the_known_ones(client: TestClient) -> None:
    response = client.post("/clear", json={"instance_id": "i", "location": "GPU0"})
    assert "LocalCPUBackend, LocalGPUBackend, LocalDiskBackend" in response.json()["detail"]


def test_an_oversized_body_is_413(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "MAX_BODY_BYTES", 64)
    response = client.post("/lookup", json={"tokens": list(range(100))})
    assert response.status_code == 413 and response.json()["error"] == "body_too_large"


def test_unknown_paths_and_methods_answer_json(client: TestClient) -> None:
    assert client.get("/nowhere").json()["detail"] == "Not Found"
    response = client.get("/clear")
    assert response.status_code == 405 and response.json()["error"] == "http"


def test_redis_down_is_503_and_the_controller_recovers(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        config = BASE.with_overrides(redis_url=server.url)
        hold(server.url, "keeper", SEED_TOKENS)
        with CheckedClient(create_app(config)) as client:
            assert lookup(client, SEED_TOKENS) == {"keeper": ["LocalCPUBackend", 12]}
            server.kill()
            for path, body in (
                ("/lookup", {"tokens": SEED_TOKENS}),
                ("/clear", {"instance_id": "keeper", "location": "LocalCPUBackend"}),
            ):
                response = client.post(path, json=body)
                assert response.status_code == 503
                assert response.json()["error"] == "redis_unavailable"
                assert "Redis is unreachable" in response.json()["detail"]
            assert client.get("/healthz").status_code == 503
            server.start()
            hold(server.url, "keeper", SEED_TOKENS)  # a restarted Redis is empty until agents re-register
            assert lookup(client, SEED_TOKENS) == {"keeper": ["LocalCPUBackend", 12]}
            assert client.get("/healthz").json()["status"] == "ok"
    finally:
        server.kill()


def test_a_prefix_spread_over_locations_counts_whole_and_names_the_last_chunks_place(
    client: TestClient,
    redis_url: str,
) -> None:
    redis_client = redis.Redis.from_url(redis_url, decode_responses=True)
    Registration(
        redis_client,
        instance_id="tiered",
        worker_id=0,
        space=SPACE,
        locations=[Location.GPU, Location.CPU, Location.DISK],
        address=WorkerAddress("127.0.0.1", None, None),
        ttl_s=60,
    ).register()
    writer = IndexWriter(redis_client, "tiered")
    chunks = SPACE.chunks(PROMPT)
    places = [(Location.CPU, Location.GPU), (Location.CPU,), (Location.DISK,)]  # chunk 3 is nowhere
    for chunk, where in zip(chunks, places, strict=False):
        for location in where:
            writer.admitted(location, IndexEntry(chunk.key, chunk.num_tokens, chunk.start == 0))
    writer.flush()
    assert lookup(client, PROMPT) == {"tiered": ["LocalDiskBackend", 768]}
    assert lookup(client, PROMPT[:256]) == {"tiered": ["LocalGPUBackend", 256]}
