"""The scheduler side's index reads, against a real Redis that an agent's IndexWriter fills."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.index_reader import IndexReader
from kvbus.agent.index_writer import IndexWriter
from kvbus.agent.paged_blocks import Layout
from kvbus.agent.registration import Registration, WorkerAddress
from kvbus.shared import redis_conn
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location
from tests.conftest import RedisServer, free_port

INSTANCE = "inst"
SPACE = HashSpace("m", chunk_size=4)
WORKER_LAYOUT = Layout("m", "bfloat16", 4, "CPU_ATTN:vec")
PROMPT = list(range(14))
KEYS = [c.key for c in SPACE.chunks(PROMPT)]


def register(client: redis.Redis, layout: Layout | None) -> None:
    Registration(
        client,
        instance_id=INSTANCE,
        worker_id=0,
        space=SPACE,
        locations=[Location.CPU],
        address=WorkerAddress("127.0.0.1", None, None),
        ttl_s=5,
        layout=None if layout is None else str(layout),
    ).register()


def admit(client: redis.Redis, tokens: list[int]) -> None:
    writer = IndexWriter(client, INSTANCE, 0)
    for chunk in SPACE.chunks(tokens):
        writer.admitted(Location.CPU, IndexEntry(chunk.key, chunk.num_tokens, chunk.start == 0))
    writer.flush()


def reader(client: redis.Redis, **kwargs: float) -> IndexReader:
    return IndexReader(
        client, INSTANCE, worker_id=0, location=Location.CPU, layout=Layout("m", "bfloat16", 4), **kwargs
    )


def test_held_counts_the_chunks_held_from_the_first(real_redis: redis.Redis) -> None:
    register(real_redis, WORKER_LAYOUT)
    admit(real_redis, PROMPT[:8])
    assert reader(real_redis).held(KEYS) == 2
    admit(real_redis, PROMPT)
    assert reader(real_redis).held(KEYS) == 4
    assert reader(real_redis).held([KEYS[0], "absent", KEYS[2]]) == 1


@pytest.mark.parametrize(
    "layout",
    [None, Layout("m", "bfloat16", 16, "FLASH_ATTN"), Layout("m", "float32", 4, "x")],
    ids=["unregistered", "other-block-size", "other-dtype"],
)
def test_chunks_of_another_layout_count_as_misses(real_redis: redis.Redis, layout: Layout | None) -> None:
    register(real_redis, layout)
    admit(real_redis, PROMPT)
    assert reader(real_redis).held(KEYS) == 0


def test_an_unreachable_redis_is_a_miss_and_is_not_asked_again_for_a_while() -> None:
    client = redis_conn.connect(f"redis://127.0.0.1:{free_port()}/0")
    slow = reader(client, backoff_s=60)
    started = time.monotonic()
    assert slow.held(KEYS) == 0
    first = time.monotonic() - started
    started = time.monotonic()
    assert slow.held(KEYS) == 0
    assert time.monotonic() - started < max(first / 10, 0.001)


def test_a_stalled_redis_costs_one_lookup_the_request_path_bound_then_nothing(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    assert server.process is not None
    setup = redis_conn.connect(server.url)
    register(setup, WORKER_LAYOUT)
    admit(setup, PROMPT)
    lookups = reader(redis_conn.connect(server.url, request_path=True), backoff_s=1.0)
    try:
        assert lookups.held(KEYS) == 4
        os.kill(server.process.pid, signal.SIGSTOP)  # the connection stays open; nothing answers on it
        started = time.monotonic()
        assert lookups.held(KEYS) == 0
        assert time.monotonic() - started < redis_conn.REQUEST_PATH_TIMEOUT_S + 0.5
        started = time.monotonic()
        assert lookups.held(KEYS) == 0
        assert time.monotonic() - started < 0.05
        os.kill(server.process.pid, signal.SIGCONT)
        time.sleep(1.0)
        assert lookups.held(KEYS) == 4
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        setup.close()
        server.kill()
