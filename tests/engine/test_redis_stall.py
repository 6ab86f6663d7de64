"""The engine in process while its Redis is stalled (SIGSTOP): completions neither wait on Redis nor lose
their reuse, and what they stored reaches the index once Redis answers again.

Nothing on a completion's path talks to Redis: the agent keeps the KV in its memory tier and queues
the index writes for its writer thread. This pins that down against a Redis that accepts
connections but never answers, the case that costs a caller its full socket timeouts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient

from kvbus.engine import app
from kvbus.engine.model import ModelShape, TinyLlama
from kvbus.shared import keys
from kvbus.shared.config import KVBusConfig
from kvbus.shared.locations import Location
from tests.conftest import MODEL, RedisServer
from tests.engine.conftest import SHAPE

INSTANCE = "engine-stalled"
STALL_S = 6.0  # past one 5 s socket timeout of the agent's client, so its retries happen mid-stall too
# 300 tokens each: a full chunk and a 44-token tail, so two index entries a prompt. Enough for a fast box to
# serve a cold one every 20 ms of the stall.
PROMPTS = [list(range(1000 + 300 * i, 1300 + 300 * i)) for i in range(int(STALL_S / 0.02))]


@pytest.fixture
def client(stallable_redis: RedisServer, model: TinyLlama, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    def built(shape: ModelShape, seed: int) -> TinyLlama:
        assert (shape, seed) == (SHAPE, 0)
        return model

    monkeypatch.setattr(app, "build_model", built)
    config = KVBusConfig(
        enable_controller=True, redis_url=stallable_redis.url, lmcache_instance_id=INSTANCE, heartbeat_interval=0.1
    )
    with TestClient(app.create_app(config, MODEL, shape=SHAPE)) as test_client:
        yield test_client


def timed_completion(client: TestClient, prompt: list[int]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    return time.monotonic() - started, response.json()


def index_entries(server: RedisServer) -> int:
    with redis.Redis.from_url(server.url) as reader:
        return int(reader.hlen(keys.index(INSTANCE, 0, Location.CPU)))


def test_completions_go_on_while_redis_is_stalled_and_are_indexed_once_it_answers(
    client: TestClient, stallable_redis: RedisServer
) -> None:
    normal = max(timed_completion(client, prompt)[0] for prompt in PROMPTS[:3])
    assert index_entries(stallable_redis) == 6

    stallable_redis.pause()
    stalled_at = time.monotonic()
    served = 3
    while time.monotonic() - stalled_at < STALL_S:
        took, body = timed_completion(client, PROMPTS[served])
        assert took < normal + 1.0, f"a cold completion took {took:.2f} s with Redis stalled, {normal:.2f} s before"
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        took, body = timed_completion(client, PROMPTS[0])
        assert took < normal + 1.0, f"a warm completion took {took:.2f} s with Redis stalled, {normal:.2f} s before"
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 299  # reused from the agent's memory
        assert client.get("/health").status_code == 200
        served += 1

    stallable_redis.resume()
    resumed_at = time.monotonic()
    while index_entries(stallable_redis) < 2 * served:
        assert time.monotonic() - resumed_at < 1.0, "the stalled stores did not reach the index within 1 s"
        time.sleep(0.02)
    assert index_entries(stallable_redis) == 2 * served
