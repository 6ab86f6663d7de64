"""Unmodified LMCache 0.5.6 engines on kvbus: kvbus's controller process (`kvbus controller --monitor-ports`) and
real LMCacheEngines with their own LMCacheWorker (harness.build_engine: LocalCPUBackend and LMCache's mock GPU
connector, in .venv-lmcache processes driven by engine_driver.py), against a redis-server of the module's own.

The engines are not inside vLLM: LMCache's vLLM connector cannot run in CPU vLLM. In vLLM 0.32's CPU build
`CreateGPUConnector(..., EngineType.VLLM)` has connectors only for cuda, xpu, musa and hpu and raises "No supported
cpu connector found", so LMCache marks itself failed, builds no engine and no LMCacheWorker, and nothing ever
registers (docs/lmcache-recorded.md, section 5). What vLLM's connector would do after a prefill, `engine.store`,
is done here directly; everything the control plane sees (registration, admit and evict batches, the worker's REP
socket answering commands) is LMCache's own code.

One controller and four engine processes (started together) serve the module; each test has instances and
prompts of its own. The restart test has a stack of its own, since it kills its controller.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from kvbus.shared import keys
from tests.conftest import SEED_TOKENS, RedisServer, free_port, wait_for
from tests.lmcache.stack import CPU, EngineDriver, EngineSpec, Stack

MIXED_PROMPT = list(range(2000, 2600))  # 256 + 256 + 88 tokens
TP_PROMPT = list(range(3000, 3300))  # 256 + 44
HUNG_PROMPT = list(range(4000, 4256))
RESTART_PROMPT = list(range(5000, 5600))
INDEX_WAIT_S = 15.0


def post(base: str, path: str, body: dict[str, Any], timeout: float = 15.0) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=timeout)


def lookup(base: str, tokens: list[int]) -> dict[str, list[Any]]:
    response = post(base, "/lookup", {"tokens": tokens})
    assert response.status_code == 200, response.text
    layout: dict[str, list[Any]] = response.json()["layout_info"]
    return layout


def clear(base: str, instance_id: str) -> dict[str, Any]:
    response = post(base, "/clear", {"instance_id": instance_id, "location": CPU})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["event_id"].startswith("Clear")
    return answer


def indexed(client: redis.Redis, instance_id: str, worker_id: int = 0) -> int:
    return int(client.hlen(keys.index(instance_id, worker_id, CPU)))


def wait_indexed(client: redis.Redis, instance_id: str, chunks: int, worker_id: int = 0) -> None:
    wait_for(
        lambda: indexed(client, instance_id, worker_id) == chunks,
        timeout=INDEX_WAIT_S,
        what=f"{chunks} chunks in {instance_id} rank {worker_id}'s index",
    )


def wait_registered(client: redis.Redis, instance_id: str, ranks: int) -> None:
    wait_for(
        lambda: client.scard(keys.workers(instance_id)) == ranks and client.exists(keys.alive(instance_id)),
        timeout=30,
        what=f"{ranks} LMCache worker(s) of {instance_id} registered",
    )


@dataclass
class Fleet:
    url: str
    redis: redis.Redis
    seed: EngineDriver
    mixed: EngineDriver
    tp: EngineDriver
    hung: EngineDriver


@pytest.fixture(scope="module")
def fleet(
    lmcache_engines: None, module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    stack = Stack(tmp_path_factory.mktemp("lmcache"), module_redis.url)
    client = redis.Redis.from_url(module_redis.url, decode_responses=True)
    try:
        _, url = stack.lmcache_controller()
        seed, mixed, tp, hung = stack.start_engines(
            [
                EngineSpec("lmc-seed"),
                EngineSpec("lmc-mixed"),
                EngineSpec("lmc-tp", ranks=(0, 1), world_size=2),
                EngineSpec("lmc-hung"),
            ]
        )
        for instance_id, ranks in (("lmc-seed", 1), ("lmc-mixed", 1), ("lmc-tp", 2), ("lmc-hung", 1)):
            wait_registered(client, instance_id, ranks)
        # A kvbus agent beside them, holding the whole mixed prompt in kvbus's own hash space.
        stack.agent(module_redis.url, "kvbus-mixed", "--preload-tokens", ",".join(map(str, MIXED_PROMPT)))
        yield Fleet(url, client, seed, mixed, tp, hung)
    finally:
        client.close()
        stack.stop_all()


def test_the_seed_flow_against_lmcaches_own_worker(fleet: Fleet) -> None:
    fleet.seed.store(SEED_TOKENS)
    wait_indexed(fleet.redis, "lmc-seed", 1)
    assert lookup(fleet.url, SEED_TOKENS) == {"lmc-seed": [CPU, 12]}
    assert clear(fleet.url, "lmc-seed")["num_tokens"] == 12
    assert fleet.seed.held(SEED_TOKENS) == 0  # LMCache's engine really dropped the chunk
    assert lookup(fleet.url, SEED_TOKENS) == {}  # the controller waits for the evictions LMCache reports after


def test_the_very_next_lookup_after_a_clear_no_longer_names_the_lmcache_instance(fleet: Fleet) -> None:
    stale = 0
    with httpx.Client(base_url=fleet.url, timeout=15) as client:  # keep-alive: the next request goes at once
        for _ in range(10):
            fleet.seed.store(SEED_TOKENS)
            wait_indexed(fleet.redis, "lmc-seed", 1)
            assert client.post("/clear", json={"instance_id": "lmc-seed", "location": CPU}).json()["num_tokens"] == 12
            stale += bool(client.post("/lookup", json={"tokens": SEED_TOKENS}).json()["layout_info"])
            wait_indexed(fleet.redis, "lmc-seed", 0)
    assert stale == 0, f"{stale} of 10 lookups right after a clear still named the cleared instance"


def test_lookups_name_an_lmcache_worker_and_a_kvbus_agent_side_by_side_and_each_clears_alone(fleet: Fleet) -> None:
    fleet.mixed.store(MIXED_PROMPT[:512])
    wait_indexed(fleet.redis, "lmc-mixed", 2)
    assert lookup(fleet.url, MIXED_PROMPT) == {"kvbus-mixed": [CPU, 600], "lmc-mixed": [CPU, 512]}
    assert lookup(fleet.url, MIXED_PROMPT[:300]) == {"kvbus-mixed": [CPU, 256], "lmc-mixed": [CPU, 256]}

    assert clear(fleet.url, "lmc-mixed")["num_tokens"] == 512
    wait_indexed(fleet.redis, "lmc-mixed", 0)
    assert lookup(fleet.url, MIXED_PROMPT) == {"kvbus-mixed": [CPU, 600]}
    assert fleet.mixed.held(MIXED_PROMPT) == 0

    fleet.mixed.store(MIXED_PROMPT)
    wait_indexed(fleet.redis, "lmc-mixed", 3)
    assert clear(fleet.url, "kvbus-mixed")["num_tokens"] == 600
    assert lookup(fleet.url, MIXED_PROMPT) == {"lmc-mixed": [CPU, 600]}
    assert fleet.mixed.held(MIXED_PROMPT) == 600  # the agent's clear left the LMCache engine alone


def test_two_lmcache_ranks_of_one_instance_are_credited_with_what_both_hold_and_both_take_commands(
    fleet: Fleet,
) -> None:
    fleet.tp.store(TP_PROMPT, rank=0)
    wait_indexed(fleet.redis, "lmc-tp", 2, worker_id=0)
    assert lookup(fleet.url, TP_PROMPT) == {}  # rank 1 holds nothing: a TP engine could load nothing
    fleet.tp.store(TP_PROMPT[:256], rank=1)
    wait_indexed(fleet.redis, "lmc-tp", 1, worker_id=1)
    assert lookup(fleet.url, TP_PROMPT) == {"lmc-tp": [CPU, 256]}

    workers = httpx.get(f"{fleet.url}/controller/workers", params={"instance_id": "lmc-tp"}, timeout=10).json()
    assert sorted((w["worker_id"], w["key_count"]) for w in workers["workers"]) == [(0, 2), (1, 1)]
    health = post(fleet.url, "/health", {"instance_id": "lmc-tp"})
    assert health.status_code == 200 and health.json()["error_codes"] == {"0": 0, "1": 0}

    answer = clear(fleet.url, "lmc-tp")
    assert answer["num_tokens"] == 256 and answer["num_tokens_per_worker"] == {"0": 300, "1": 256}
    wait_indexed(fleet.redis, "lmc-tp", 0, worker_id=0)
    wait_indexed(fleet.redis, "lmc-tp", 0, worker_id=1)
    assert lookup(fleet.url, TP_PROMPT) == {}
    assert fleet.tp.held(TP_PROMPT, rank=0) == 0 and fleet.tp.held(TP_PROMPT, rank=1) == 0


def test_a_worker_that_never_answers_costs_a_504_and_commands_go_through_once_it_answers_again(
    fleet: Fleet,
) -> None:
    fleet.hung.store(HUNG_PROMPT)
    wait_indexed(fleet.redis, "lmc-hung", 1)
    fleet.hung.pause()
    try:
        started = time.monotonic()
        response = post(fleet.url, "/clear", {"instance_id": "lmc-hung", "location": CPU})
        waited = time.monotonic() - started
        assert response.status_code == 504, response.text
        assert response.json()["error"] == "agent_timeout"
        assert "worker 0 of 'lmc-hung' did not answer within 3 s" in response.json()["detail"]
        assert 2.5 <= waited <= 8.0  # the controller's command_timeout is 3 s
    finally:
        fleet.hung.resume()
    # The late clear reaches the engine once it runs again; a new one is answered.
    wait_for(lambda: clear(fleet.url, "lmc-hung")["num_tokens"] == 0, timeout=20, what="a clear answered again")
    assert fleet.hung.held(HUNG_PROMPT) == 0


@pytest.fixture
def restart_stack(lmcache_engines: None, tmp_path: Path) -> Iterator[Stack]:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    stack = Stack(tmp_path, server.url)
    try:
        yield stack
    finally:
        stack.stop_all()
        server.kill()


def test_a_controller_killed_while_lmcache_workers_are_registered_loses_nothing(restart_stack: Stack) -> None:
    stack = restart_stack
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        first, url = stack.lmcache_controller()
        (engine,) = stack.start_engines([EngineSpec("lmc-restart", heartbeat_s=0.5)])
        wait_registered(client, "lmc-restart", 1)
        engine.store(RESTART_PROMPT)
        wait_indexed(client, "lmc-restart", 3)
        assert lookup(url, RESTART_PROMPT) == {"lmc-restart": [CPU, 600]}

        first.kill()
        first.wait(10)
        _, url = stack.lmcache_controller()  # the same monitor ports; the workers reconnect by themselves

        assert indexed(client, "lmc-restart") == 3
        assert lookup(url, RESTART_PROMPT) == {"lmc-restart": [CPU, 600]}
        beat = float(client.hget(keys.worker("lmc-restart", 0), "last_heartbeat_time") or 0)
        wait_for(
            lambda: float(client.hget(keys.worker("lmc-restart", 0), "last_heartbeat_time") or 0) > beat,
            timeout=10,
            what="a heartbeat through the new controller",
        )
        assert clear(url, "lmc-restart")["num_tokens"] == 600  # the command reached the worker
        assert engine.held(RESTART_PROMPT) == 0
        wait_indexed(client, "lmc-restart", 0)
        # Its admits reach the new controller, and no full sync froze it (a frozen worker skips stores).
        engine.store(RESTART_PROMPT[:512])
        wait_indexed(client, "lmc-restart", 2)
        assert lookup(url, RESTART_PROMPT) == {"lmc-restart": [CPU, 512]}
    finally:
        client.close()
