"""An agent whose Redis is not up yet waits for it, and a stop ends the wait."""

from __future__ import annotations

import threading
from pathlib import Path

import redis

from kvbus.agent.agent import Agent
from kvbus.shared import keys
from kvbus.shared.config import KVBusConfig
from tests.conftest import MODEL, RedisServer, free_port

INSTANCE = "late-redis"


def test_an_agent_waits_for_redis_then_registers(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)
    agent = Agent(KVBusConfig(enable_controller=True, redis_url=server.url, lmcache_instance_id=INSTANCE), model=MODEL)
    stop = threading.Event()
    outcome: list[bool] = []
    waiting = threading.Thread(target=lambda: outcome.append(agent.start_when_reachable(stop, retry_s=0.05)))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive(), "the agent gave up instead of waiting for Redis"
    server.start()
    try:
        waiting.join(10)
        assert outcome == [True]
        client = redis.Redis.from_url(server.url)
        assert client.exists(keys.alive(INSTANCE)) and client.sismember(keys.INSTANCES, INSTANCE)
        agent.stop()
        assert not client.sismember(keys.INSTANCES, INSTANCE)
        client.close()
    finally:
        server.kill()


def test_a_stop_ends_the_wait() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    agent = Agent(KVBusConfig(enable_controller=True, redis_url=url, lmcache_instance_id=INSTANCE), model=MODEL)
    stop = threading.Event()
    outcome: list[bool] = []
    waiting = threading.Thread(target=lambda: outcome.append(agent.start_when_reachable(stop, retry_s=0.05)))
    waiting.start()
    stop.set()
    waiting.join(10)
    assert outcome == [False]


def test_a_stop_wakes_the_heartbeat_from_a_long_sleep(redis_url: str) -> None:
    config = KVBusConfig(
        enable_controller=True,
        redis_url=redis_url,
        lmcache_instance_id=INSTANCE,
        heartbeat_interval=600.0,
        heartbeat_ttl=900.0,
    )
    agent = Agent(config, model=MODEL)
    agent.start()
    beating = [t for t in threading.enumerate() if t.name.startswith("kvbus-heartbeat-")]
    assert len(beating) == 1 and beating[0].is_alive()
    agent.stop()
    # stop() waits 10 s for each thread: one still asleep in its 600 s beat interval would outlive it.
    assert not beating[0].is_alive()
    client = redis.Redis.from_url(redis_url)
    assert not client.sismember(keys.INSTANCES, INSTANCE)
    client.close()
