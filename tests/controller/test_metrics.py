"""GET /metrics after known traffic, in process against real redis-server and agents on threads:
request counts per route, command outcomes, lookup hits and misses, index sizes, heartbeats and bus lag."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from kvbus.agent.agent import Agent
from kvbus.agent.synthetic import synthetic_kv
from kvbus.controller.app import create_app
from kvbus.shared import keys
from kvbus.shared.config import KVBusConfig
from tests.conftest import MODEL, free_port

INSTANCE = "metrics-instance"
PROMPT = list(range(1000, 1600))  # chunks of 256, 256 and 88 tokens
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 16 * 2  # synthetic KV: K and V, 4 layers, 2 heads of 16, float16
BASE = KVBusConfig(
    enable_controller=True, command_timeout=0.5, heartbeat_interval=0.1, heartbeat_ttl=30, lmcache_instance_id=INSTANCE
)
CPU = {"instance_id": INSTANCE, "location": "LocalCPUBackend"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


@pytest.fixture
def agent(config: KVBusConfig) -> Iterator[Agent]:
    started = Agent(config, model=MODEL)
    started.start()
    started.tiers.store(PROMPT, synthetic_kv(started.space, PROMPT))
    started.index.flush()
    yield started
    started.stop()


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_for_scrape(client: TestClient, shows: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until a scrape `shows` what was waited for; each scrape is counted, at most one a heartbeat."""
    deadline = time.monotonic() + 10
    while not shows(samples := scrape(client)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no scrape showed {what}")
        time.sleep(BASE.heartbeat_interval)
    return samples


def test_requests_lookups_commands_and_the_index_are_counted(client: TestClient, agent: Agent) -> None:
    for tokens in (PROMPT, PROMPT[:300], [7, 8, 9]):
        assert client.post("/lookup", json={"tokens": tokens}).status_code == 200
    assert client.post("/lookup", json={"tokens": "x"}).status_code == 422
    worker = {"instance_id": INSTANCE, "worker_id": "0", "location": "LocalCPUBackend"}
    # The fleet's series are as of each worker's last heartbeat (every 0.1 s here).
    before = wait_for_scrape(client, lambda s: value(s, "kvbus_worker_chunks", **worker) == 3, "the stored chunks")
    assert value(before, "kvbus_index_chunks", **worker) == 3
    assert value(before, "kvbus_worker_chunks", **worker) == 3
    assert value(before, "kvbus_worker_bytes", **worker) == 600 * KV_BYTES_PER_TOKEN
    assert value(before, "kvbus_worker_capacity_bytes", **worker) == BASE.max_local_cpu_size * 1024**3
    assert value(before, "kvbus_workers_registered", instance_id=INSTANCE) == 1
    assert value(before, "kvbus_workers_alive", instance_id=INSTANCE) == 1
    assert value(before, "kvbus_instance_alive", instance_id=INSTANCE) == 1
    assert 0 <= (value(before, "kvbus_worker_heartbeat_age_seconds", instance_id=INSTANCE, worker_id="0") or -1) < 5
    assert value(before, "kvbus_bus_unacked_commands", instance_id=INSTANCE, worker_id="0") == 0
    assert value(before, "kvbus_bus_lag_seconds", instance_id=INSTANCE, worker_id="0") == 0
    assert value(before, "kvbus_redis_up") == 1

    assert client.post("/clear", json=CPU).json()["num_tokens"] == 600
    assert client.post("/clear", json={**CPU, "instance_id": "ghost"}).status_code == 404
    assert client.post("/clear", json={"instance_id": INSTANCE}).status_code == 422
    assert client.get("/no/such/page").status_code == 404
    shown = wait_for_scrape(client, lambda s: value(s, "kvbus_index_chunks", **worker) == 0, "the clear's heartbeat")
    after = scrape(client)
    lookup = {"method": "POST", "path": "/lookup"}
    assert value(after, "kvbus_http_requests_total", **lookup, status="200") == 3
    assert value(after, "kvbus_http_requests_total", **lookup, status="422") == 1
    assert value(after, "kvbus_http_request_duration_seconds_count", **lookup, status="200") == 3
    for status in ("200", "404", "422"):
        assert value(after, "kvbus_http_requests_total", method="POST", path="/clear", status=status) == 1
    assert value(after, "kvbus_http_requests_total", method="GET", path="<unmatched>", status="404") == 1
    scrapes = value(after, "kvbus_http_requests_total", method="GET", path="/metrics", status="200")
    assert scrapes == (value(shown, "kvbus_http_requests_total", method="GET", path="/metrics", status="200") or 0) + 1
    assert value(after, "kvbus_lookups_total", result="hit") == 2
    assert value(after, "kvbus_lookups_total", result="miss") == 1
    assert value(after, "kvbus_commands_total", kind="clear", outcome="ok") == 1
    assert value(after, "kvbus_commands_total", kind="clear", outcome="timeout") == 0
    assert value(after, "kvbus_worker_chunks", **worker) == 0


def test_a_silent_agent_shows_as_bus_lag_read_or_not(
    client: TestClient, config: KVBusConfig, real_redis: redis.Redis
) -> None:
    silent = Agent(config, model=MODEL)
    silent.registration.register()
    silent.consumer.ensure_group()
    assert client.post("/clear", json=CPU).status_code == 504
    # Its command thread is stuck, its heartbeat thread is not: each beat brings the backlog to the scrape.
    silent.registration.heartbeat()
    unread = scrape(client)
    labels = {"instance_id": INSTANCE, "worker_id": "0"}
    assert value(unread, "kvbus_bus_unacked_commands", **labels) == 1
    assert (value(unread, "kvbus_bus_lag_seconds", **labels) or 0) >= 0.5  # it waited command_timeout for it
    assert value(unread, "kvbus_commands_total", kind="clear", outcome="timeout") == 1
    assert value(unread, "kvbus_commands_total", kind="clear", outcome="ok") == 0
    # Read but never acked (an agent stuck on it): now pending, and as old.
    group = keys.command_group(0)
    real_redis.xreadgroup(group, group, {keys.commands(INSTANCE): ">"}, count=1)
    silent.registration.heartbeat()
    pending = scrape(client)
    assert value(pending, "kvbus_bus_unacked_commands", **labels) == 1
    assert (value(pending, "kvbus_bus_lag_seconds", **labels) or 0) >= (
        value(unread, "kvbus_bus_lag_seconds", **labels) or 0
    )


def test_refusals_are_counted_per_kind(client: TestClient, config: KVBusConfig, tmp_path: Path) -> None:
    agent = Agent(config.with_overrides(local_disk=str(tmp_path / "disk"), max_local_disk_size=1), model=MODEL)
    agent.start()
    try:
        body = {"instance_id": INSTANCE, "location": "LocalDiskBackend", "method": "zlib"}
        assert client.post("/compress", json=body).json()["error"] == "refused"
        samples = scrape(client)
        assert value(samples, "kvbus_commands_total", kind="compress", outcome="refused") == 1
        assert value(samples, "kvbus_http_requests_total", method="POST", path="/compress", status="400") == 1
    finally:
        agent.stop()


def test_without_redis_the_process_counters_are_still_served() -> None:
    config = BASE.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(config)) as client:
        client.post("/lookup", json={"tokens": [1]})
        samples = scrape(client)
    assert value(samples, "kvbus_redis_up") == 0
    assert value(samples, "kvbus_http_requests_total", method="POST", path="/lookup", status="503") == 1
    assert not any(name.startswith("kvbus_index_chunks") for name, _ in samples)


def test_each_app_counts_only_its_own_requests(config: KVBusConfig) -> None:
    with TestClient(create_app(config)) as first, TestClient(create_app(config)) as second:
        first.get("/healthz")
        assert value(scrape(second), "kvbus_http_requests_total", method="GET", path="/healthz", status="200") is None
        assert value(scrape(first), "kvbus_http_requests_total", method="GET", path="/healthz", status="200") == 1
