"""An agent whose Redis is not up yet waits for it, and a stop ends the wait."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from kvbus.agent.agent import Agent
from kvbus.agent.synthetic import synthetic_kv
from kvbus.shared import keys, redis_conn
from kvbus.shared.config import KVBusConfig
from tests.conftest import MODEL, RedisServer, free_port, wait_for, wait_for_a_beat_waiting

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


def beating_agent(redis_url: str, *, interval_s: float, ttl_s: float) -> Agent:
    config = KVBusConfig(
        enable_controller=True,
        redis_url=redis_url,
        lmcache_instance_id=INSTANCE,
        heartbeat_interval=interval_s,
        heartbeat_ttl=ttl_s,
    )
    return Agent(config, model=MODEL)


def beat_waits(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The wait each of `agent`'s beats asks for, in order, from now on."""
    waits: list[float] = []
    heartbeat = agent.registration.heartbeat

    def counted(wait_s: float = 0.0) -> bool:
        waits.append(wait_s)
        return heartbeat(wait_s)

    monkeypatch.setattr(agent.registration, "heartbeat", counted)
    return waits


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kvbus-heartbeat-")]


def test_a_stop_wakes_the_heartbeat_from_a_long_sleep(redis_url: str) -> None:
    agent = beating_agent(redis_url, interval_s=600.0, ttl_s=900.0)
    agent.start()
    beating = heartbeat_threads()
    assert len(beating) == 1 and beating[0].is_alive()
    agent.stop()
    # stop() waits 10 s for each thread: one still asleep in its 600 s beat interval would outlive it.
    assert not beating[0].is_alive()
    client = redis.Redis.from_url(redis_url)
    assert not client.sismember(keys.INSTANCES, INSTANCE)
    client.close()


def test_an_idle_agents_heartbeat_waits_in_redis_and_a_stop_wakes_it(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Connections with a long socket timeout, so that a 20 s beat interval can be waited in Redis.
    monkeypatch.setattr(redis_conn, "COMMAND_TIMEOUT_S", 60.0)
    agent = beating_agent(redis_url, interval_s=20.0, ttl_s=60.0)
    agent.start()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    wait_for_a_beat_waiting(client)
    beating = heartbeat_threads()
    agent.stop()
    # stop() waits 10 s for each thread: one left in its 20 s wait would outlive it.
    assert not beating[0].is_alive()
    assert not client.exists(keys.beat_wake(INSTANCE, 0)) and not client.sismember(keys.INSTANCES, INSTANCE)
    client.close()


def test_a_heartbeat_whose_wait_redis_refuses_sleeps_instead_and_says_so(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    agent = beating_agent(redis_url, interval_s=0.2, ttl_s=0.6)  # quiet beats too come every 0.2 s
    beats = beat_waits(agent, monkeypatch)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.set(keys.beat_wake(INSTANCE, 0), "not a list")  # every wait fails at once: WRONGTYPE
    agent.start()
    try:
        time.sleep(1.0)
        assert 2 <= len(beats) <= 20, f"{len(beats)} beats in 1 s at a 0.2 s interval"
        assert beats[0] == 0.2 and set(beats[1:]) == {0.0}  # after the refusal, each beat sleeps first
        assert client.pttl(keys.alive(INSTANCE)) > 0
        refused = [m for m in caplog.messages if "refused the heartbeat's wait" in m]
        assert len(refused) == 1 and keys.beat_wake(INSTANCE, 0) in refused[0] and "WRONGTYPE" in refused[0]
        assert not any("heartbeat to Redis" in m for m in caplog.messages)  # no outage: the beats ran
    finally:
        agent.stop()
        client.close()


def test_a_quiet_agent_beats_every_third_of_its_ttl_and_a_change_brings_its_interval_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = beating_agent(redis_url, interval_s=0.1, ttl_s=1.5)  # quiet: every 0.5 s
    waits = beat_waits(agent, monkeypatch)
    client = redis.Redis.from_url(redis_url)
    agent.start()
    try:
        wait_for(lambda: len(waits) > 1, what="two beats")
        assert waits[0] == 0.1  # the first beat, right after registering, is not quiet
        wait_for(lambda: waits[-2:] == [0.5, 0.5], what="quiet beats")
        alive_ms = []
        for _ in range(10):  # two quiet beats and more: liveness never comes near its end
            alive_ms.append(client.pttl(keys.alive(INSTANCE)))
            time.sleep(0.1)
        assert min(alive_ms) > 500, alive_ms
        seen = len(waits)
        tokens = list(range(256))
        agent.tiers.store(tokens, synthetic_kv(agent.space, tokens))
        wait_for(lambda: 0.1 in waits[seen:], what="a beat at heartbeat_interval after the store")
        wait_for(lambda: waits[-2:] == [0.5, 0.5], what="quiet beats again")
    finally:
        agent.stop()
        client.close()
