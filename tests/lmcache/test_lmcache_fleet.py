"""1000 LMCache workers registered at once with one kvbus controller process (`kvbus controller --monitor-ports`).

1000 real LMCache engines would not fit on a test box, so the workers are fake_fleet's: LMCache's protocol over
real ZMQ sockets, framed as LMCacheWorker frames it, from one process (a DEALER and a PUSH socket per worker,
and a pool of four ROUTER sockets answering the controller's commands for all of them). Needs only .venv.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from kvbus.shared import keys
from kvbus.shared.hashing import LMCacheHashSpace
from tests.conftest import RedisServer, wait_for
from tests.lmcache.fake_fleet import AnswerPool, Pushers, Worker, admit_frames, register
from tests.lmcache.stack import CPU, Stack

WORKERS = 1000
PROMPT = list(range(7000, 7600))  # 256 + 256 + 88 tokens
HOLDERS = {0: 3, 1: 3, 2: 2}  # worker number -> chunks of PROMPT it holds, first ones first
CLEARED_TOKENS = 4096


def chunks_of(number: int) -> int:
    return max(number % 7 + 1, HOLDERS.get(number, 0))


@dataclass
class Fleet:
    url: str
    redis: redis.Redis
    workers: list[Worker]
    pool: AnswerPool


def _instance(number: int) -> str:
    return f"fleet-{number:04d}"


@pytest.fixture(scope="module")
def fleet(module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    stack = Stack(tmp_path_factory.mktemp("fleet"), module_redis.url)
    client = redis.Redis.from_url(module_redis.url, decode_responses=True)
    pool = AnswerPool(size=4, clear_tokens=CLEARED_TOKENS).start()
    pushers: Pushers | None = None
    try:
        _, url = stack.lmcache_controller(command_timeout=5.0)
        workers = [Worker(_instance(n), 0, pool.port_of(n)) for n in range(WORKERS)]
        register(stack.ports.reply, workers, timeout_s=60)
        rng = random.Random(9)
        prompt = [int(chunk.key) for chunk in LMCacheHashSpace().chunks(PROMPT)]
        pushers = Pushers(stack.ports.pull, WORKERS)
        batches = []
        for number, worker in enumerate(workers):
            held = prompt[: HOLDERS.get(number, 0)]
            hashes = held + [rng.getrandbits(64) - 2**63 for _ in range(chunks_of(number) - len(held))]
            batches.append((number, admit_frames(worker, hashes, batch=4)))
        pushers.send(batches)
        wait_for(
            lambda: (
                sum(client.hlen(keys.index(w.instance_id, 0, CPU)) for w in workers)
                == sum(chunks_of(n) for n in range(WORKERS))
            ),
            timeout=30,
            what="every worker's admits indexed",
        )
        yield Fleet(url, client, workers, pool)
    finally:
        if pushers is not None:
            pushers.close()
        pool.stop()
        client.close()
        stack.stop_all()


def get(fleet: Fleet, path: str, **params: Any) -> Any:
    response = httpx.get(f"{fleet.url}{path}", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_worker_of_a_thousand_registered_at_once_is_counted_with_its_keys(fleet: Fleet) -> None:
    stats = get(fleet, "/controller/key-stats")
    assert stats["total_worker_count"] == WORKERS and stats["total_instance_count"] == WORKERS
    assert stats["total_key_count"] == sum(chunks_of(n) for n in range(WORKERS))
    counts = {i["instance_id"]: (i["key_count"], i["worker_count"]) for i in stats["instances"]}
    assert counts == {_instance(n): (chunks_of(n), 1) for n in range(WORKERS)}
    assert get(fleet, "/controller/workers")["total_count"] == WORKERS


def test_query_worker_info_all_lists_every_worker_of_a_thousand_at_once(fleet: Fleet) -> None:
    response = httpx.post(f"{fleet.url}/query_worker_info", json={"instance_id": "all"}, timeout=30)
    assert response.status_code == 200, response.text
    infos = response.json()["worker_infos"]
    assert sorted((i["instance_id"], i["worker_id"], i["port"]) for i in infos) == sorted(
        (w.instance_id, w.worker_id, w.rep_port) for w in fleet.workers
    )


def test_a_lookup_among_a_thousand_lmcache_workers_names_exactly_the_holders(fleet: Fleet) -> None:
    # LMCache workers send no heartbeats: the controller's health probes keep them alive.
    wait_for(lambda: all(fleet.redis.exists(keys.alive(_instance(n))) for n in HOLDERS), what="the holders alive")
    response = httpx.post(f"{fleet.url}/lookup", json={"tokens": PROMPT}, timeout=30)
    assert response.status_code == 200, response.text
    expected = {_instance(n): [CPU, min(chunks * 256, len(PROMPT))] for n, chunks in HOLDERS.items()}
    assert response.json()["layout_info"] == expected


def test_a_clear_reaches_one_worker_of_a_thousand(fleet: Fleet) -> None:
    before = fleet.pool.requests
    response = httpx.post(f"{fleet.url}/clear", json={"instance_id": _instance(500), "location": CPU}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["num_tokens"] == CLEARED_TOKENS and fleet.pool.requests > before
