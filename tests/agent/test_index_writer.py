"""The Redis index stays equal to the backends, on fake and real Redis alike."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
import redis.cluster

from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.index_writer import LISTPACK_ENTRIES, IndexWriter
from kvbus.agent.own_connection import OwnConnection
from kvbus.shared import keys, redis_conn
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location
from tests.conftest import RedisServer, free_port, wait_for

from .test_backends import kv

SPACE = HashSpace("test/model", chunk_size=4)
INSTANCE = "inst-a"
MEMBER = keys.head_member(INSTANCE, 0)  # rank 0's member of the global head sets
CPU = Location.CPU


@pytest.fixture(params=["fake", "real"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "fake":
        yield fakeredis.FakeRedis(decode_responses=True)
        return
    url = request.getfixturevalue("redis_url")
    real = redis.Redis.from_url(url, decode_responses=True)
    yield real
    real.close()


def make(client: redis.Redis, capacity: int = 1 << 20) -> tuple[LocalCPUBackend, IndexWriter]:
    writer = IndexWriter(client, INSTANCE, 0)
    return LocalCPUBackend(SPACE, capacity, writer), writer


def test_admissions_become_index_fields_and_head_entries(client: redis.Redis) -> None:
    backend, writer = make(client)
    prompt = list(range(10))
    backend.store(prompt, kv(prompt))
    assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 0  # nothing written until a flush
    writer.flush()
    chunks = SPACE.chunks(prompt)
    assert client.hgetall(keys.index(INSTANCE, 0, CPU)) == {c.key: str(c.num_tokens) for c in chunks}
    assert client.smembers(keys.heads(INSTANCE, 0, CPU)) == {chunks[0].key}
    assert client.smembers(keys.head(CPU, chunks[0].key)) == {MEMBER}


def test_evictions_remove_fields_and_heads(client: redis.Redis) -> None:
    backend, writer = make(client, capacity=3 * 64)
    first, second = list(range(12)), list(range(100, 112))
    backend.store(first, kv(first))
    writer.flush()
    backend.store(second, kv(second))  # evicts all of `first`
    writer.drain()
    assert set(client.hkeys(keys.index(INSTANCE, 0, CPU))) == {c.key for c in SPACE.chunks(second)}
    assert client.exists(keys.head(CPU, SPACE.chunks(first)[0].key)) == 0
    assert client.smembers(keys.heads(INSTANCE, 0, CPU)) == {SPACE.chunks(second)[0].key}


def test_an_admit_then_evict_in_one_batch_nets_out(client: redis.Redis) -> None:
    backend, writer = make(client)
    prompt = [1, 2, 3, 4]
    backend.store(prompt, kv(prompt))
    backend.discard(SPACE.chunks(prompt)[0].key)
    writer.flush()
    assert client.exists(keys.index(INSTANCE, 0, CPU), keys.heads(INSTANCE, 0, CPU)) == 0
    assert client.exists(keys.head(CPU, SPACE.chunks(prompt)[0].key)) == 0


def test_clear_empties_this_location_only_and_keeps_later_admissions(client: redis.Redis) -> None:
    backend, writer = make(client)
    other = IndexWriter(client, "inst-b", 0)
    shared_prompt = list(range(8))
    LocalCPUBackend(SPACE, 1 << 20, other).store(shared_prompt, kv(shared_prompt))
    other.flush()
    backend.store(shared_prompt, kv(shared_prompt))
    writer.flush()
    client.hset(keys.index(INSTANCE, 0, Location.DISK), "k", 1)
    backend.clear()
    later = [50, 51]
    backend.store(later, kv(later))
    writer.flush()
    head = SPACE.chunks(shared_prompt)[0].key
    assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 1  # gone from the index at once
    writer.drain()  # the head hint, which lookup verifies anyway, goes on the next flush
    assert client.smembers(keys.head(CPU, head)) == {keys.head_member("inst-b", 0)}
    assert set(client.hkeys(keys.index(INSTANCE, 0, CPU))) == {SPACE.chunks(later)[0].key}
    assert client.hlen(keys.index("inst-b", 0, CPU)) == 2
    assert client.hlen(keys.index(INSTANCE, 0, Location.DISK)) == 1


def test_purge_removes_what_a_previous_run_left(client: redis.Redis) -> None:
    backend, writer = make(client)
    prompt = list(range(8))
    backend.store(prompt, kv(prompt))
    writer.flush()
    fresh = IndexWriter(client, INSTANCE, 0)  # a restarted agent: empty memory, stale Redis
    fresh.purge([CPU])
    assert (
        client.exists(
            keys.index(INSTANCE, 0, CPU), keys.heads(INSTANCE, 0, CPU), keys.head(CPU, SPACE.chunks(prompt)[0].key)
        )
        == 0
    )


def test_many_chunks_go_out_in_few_commands(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    writer = IndexWriter(client, INSTANCE, 0)
    client.config_resetstat()
    for n in range(5000):
        writer.admitted(CPU, IndexEntry(f"{n:032x}", 256, n % 32 == 0))
    writer.flush()
    stats = client.info("commandstats")
    assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 5000
    # 1000 fields per HSET, not one round trip per chunk; the first batch's one-field HSET makes it a hashtable.
    assert stats["cmdstat_hset"]["calls"] <= 6
    client.close()


def _watch_fields(monkeypatch: pytest.MonkeyPatch, steps: dict[int, Callable[[str], None]]) -> None:
    """Run `steps[n](index_key)` when a flush has made n of a location's index commands, before the next one;
    the flush sends every HSET as soon as it is made."""
    from kvbus.agent import index_writer

    monkeypatch.setattr(index_writer, "SEND_BYTES", 64 * 1024)
    fields = index_writer._fields

    def watched(index_key: str, delta: Any) -> Iterator[tuple[bytes, int]]:
        for n, command in enumerate(fields(index_key, delta)):
            if n in steps:
                steps[n](index_key)
            yield command

    monkeypatch.setattr(index_writer, "_fields", watched)


def _admit_5000(writer: IndexWriter) -> None:
    """Five HSETs of 1000 fields, of ~80 KiB each."""
    for n in range(5000):
        writer.admitted(CPU, IndexEntry(f"{n:064x}", 256, n % 32 == 0))


def test_a_flush_sends_its_first_commands_while_it_encodes_the_rest(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis_conn.connect(redis_url)
    observer = redis.Redis.from_url(redis_url, decode_responses=True)
    # Redis applies the first 1000 fields while the writer is still making its fourth HSET: it is not left
    # idle until the whole flush is encoded.
    _watch_fields(monkeypatch, {3: lambda index: wait_for(lambda: observer.hlen(index) >= 1000, 10, "1000 fields")})
    writer = IndexWriter(client, INSTANCE, 0)
    _admit_5000(writer)
    writer.flush()
    assert observer.hlen(keys.index(INSTANCE, 0, CPU)) == 5000
    observer.close()
    client.close()


def test_a_connection_lost_in_the_middle_of_a_flush_sends_it_all_again(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis_conn.connect(redis_url)
    observer = redis.Redis.from_url(redis_url, decode_responses=True)
    killed: list[int] = []

    def kill_the_writer_s_connection(_: str) -> None:
        killed.append(observer.client_kill_filter(_type="normal", skipme=True))
        observer.client_unpause()

    # Redis holds writes back while the first two HSETs go out, so they are sent but not applied when the
    # connection goes: only the retry sending them again puts their fields in.
    _watch_fields(monkeypatch, {0: lambda _: observer.client_pause(10_000, all=False), 2: kill_the_writer_s_connection})
    writer = IndexWriter(client, INSTANCE, 0)
    _admit_5000(writer)
    writer.flush()
    assert killed == [1]
    index = keys.index(INSTANCE, 0, CPU)
    assert observer.hlen(index) == 5000
    assert observer.hget(index, f"{0:064x}") == observer.hget(index, f"{4999:064x}") == "256"
    assert observer.smembers(keys.head(CPU, f"{4992:064x}")) == {MEMBER}
    assert not observer.hexists(index, keys.INDEX_HASHTABLE_NOW)
    observer.close()
    client.close()


def test_a_batch_past_the_listpack_size_makes_the_index_a_hashtable_first_and_leaves_no_trace(
    tmp_path: Path,
) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        # Left to itself, Redis would keep these hashes in a listpack whatever their size: only the writer converts.
        client.config_set("hash-max-listpack-entries", 100_000)
        writer = IndexWriter(client, INSTANCE, 0)
        big, small = keys.index(INSTANCE, 0, CPU), keys.index(INSTANCE, 0, Location.DISK)
        for n in range(LISTPACK_ENTRIES + 1):
            writer.admitted(CPU, IndexEntry(f"{n:032x}", 256, n == 0))
        for n in range(LISTPACK_ENTRIES):
            writer.admitted(Location.DISK, IndexEntry(f"{n:032x}", 256, n == 0))
        writer.flush()
        assert client.object("encoding", big) == "hashtable"
        assert client.object("encoding", small) == "listpack"  # a batch that fits keeps the compact encoding
        assert client.hlen(big) == LISTPACK_ENTRIES + 1
        assert client.hlen(small) == LISTPACK_ENTRIES
        assert not client.hexists(big, keys.INDEX_HASHTABLE_NOW)
        assert client.hget(big, f"{LISTPACK_ENTRIES:032x}") == "256"
    finally:
        client.close()
        server.kill()


def test_a_write_redis_refuses_inside_the_conversion_s_transaction_is_raised_and_kept(client: redis.Redis) -> None:
    writer = IndexWriter(client, INSTANCE, 0)
    client.set(keys.index(INSTANCE, 0, CPU), "not a hash")
    for n in range(LISTPACK_ENTRIES + 1):
        writer.admitted(CPU, IndexEntry(f"{n:032x}", 256, n == 0))
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        writer.flush()
    client.delete(keys.index(INSTANCE, 0, CPU))
    writer.flush()  # the ops stayed pending
    assert client.hlen(keys.index(INSTANCE, 0, CPU)) == LISTPACK_ENTRIES + 1


def test_a_failed_flush_keeps_its_ops_for_the_next(fake_server: fakeredis.FakeServer) -> None:
    client = fakeredis.FakeRedis(server=fake_server, decode_responses=True)
    backend, writer = make(client)
    prompt = list(range(8))
    backend.store(prompt, kv(prompt))
    fake_server.connected = False
    with pytest.raises(redis.ConnectionError):
        writer.flush()
    fake_server.connected = True
    writer.flush()
    assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 2


def test_the_background_thread_flushes_by_itself(client: redis.Redis) -> None:
    backend, writer = make(client)
    writer.start()
    try:
        prompt = list(range(8))
        backend.store(prompt, kv(prompt))
        wait_for(lambda: client.hlen(keys.index(INSTANCE, 0, CPU)) == 2, timeout=5, what="background flush")
    finally:
        writer.stop()


def test_a_long_outage_gives_way_to_a_full_resync(
    fake_server: fakeredis.FakeServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvbus.agent import index_writer

    monkeypatch.setattr(index_writer, "MAX_QUEUED_OPS", 5)
    client = fakeredis.FakeRedis(server=fake_server, decode_responses=True)
    backend, writer = make(client)
    fake_server.connected = False
    prompt = list(range(40))
    backend.store(prompt, kv(prompt))  # 10 admissions: more than may queue
    assert writer.take_resync_request() == [CPU]
    fake_server.connected = True
    backend.publish_all()
    writer.flush()
    assert set(client.hkeys(keys.index(INSTANCE, 0, CPU))) == {c.key for c in SPACE.chunks(prompt)}


def test_a_head_readmitted_right_after_a_clear_keeps_its_hint(client: redis.Redis) -> None:
    backend, writer = make(client)
    prompt = list(range(8))
    backend.store(prompt, kv(prompt))
    writer.flush()
    backend.clear()
    writer.flush()  # queues the withdrawal of the old head hint
    backend.store(prompt, kv(prompt))  # the same prompt comes straight back
    writer.drain()
    head = SPACE.chunks(prompt)[0].key
    assert client.smembers(keys.head(CPU, head)) == {MEMBER}
    assert client.smembers(keys.heads(INSTANCE, 0, CPU)) == {head}
    assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 2


def test_a_second_clear_before_the_hints_go_still_withdraws_them(client: redis.Redis) -> None:
    backend, writer = make(client)
    prompt = list(range(8))
    backend.store(prompt, kv(prompt))
    writer.flush()
    backend.clear()
    writer.flush()  # the index is gone; withdrawing the hint is queued
    backend.clear()
    writer.drain()
    assert client.exists(keys.head(CPU, SPACE.chunks(prompt)[0].key)) == 0


def test_clear_leaves_pinned_chunks_in_the_index(client: redis.Redis) -> None:
    backend, writer = make(client)
    kept, freed = list(range(10)), list(range(50, 58))
    backend.store(kept, kv(kept))
    backend.store(freed, kv(freed))
    writer.flush()
    backend.pin(kept)
    assert backend.clear() == 8
    writer.flush()  # what a command handler does before it answers
    kept_head, freed_head = SPACE.chunks(kept)[0].key, SPACE.chunks(freed)[0].key
    assert client.hgetall(keys.index(INSTANCE, 0, CPU)) == {c.key: str(c.num_tokens) for c in SPACE.chunks(kept)}
    writer.drain()
    assert client.smembers(keys.heads(INSTANCE, 0, CPU)) == {kept_head}
    assert client.smembers(keys.head(CPU, kept_head)) == {MEMBER}
    assert client.exists(keys.head(CPU, freed_head)) == 0
    backend.unpin(kept)
    assert backend.clear() == 10
    writer.drain()
    assert client.exists(keys.index(INSTANCE, 0, CPU), keys.heads(INSTANCE, 0, CPU), keys.head(CPU, kept_head)) == 0


def test_each_rank_writes_its_own_index_and_a_clear_on_one_leaves_the_other(client: redis.Redis) -> None:
    rank0, writer0 = make(client)
    writer1 = IndexWriter(client, INSTANCE, 1)
    rank1 = LocalCPUBackend(SPACE, 1 << 20, writer1)
    prompt = list(range(8))
    for backend in (rank0, rank1):
        backend.store(prompt, kv(prompt))
    writer0.flush()
    writer1.flush()
    chunks = {c.key: str(c.num_tokens) for c in SPACE.chunks(prompt)}
    head = SPACE.chunks(prompt)[0].key
    assert client.hgetall(keys.index(INSTANCE, 0, CPU)) == chunks == client.hgetall(keys.index(INSTANCE, 1, CPU))
    assert client.smembers(keys.head(CPU, head)) == {MEMBER, keys.head_member(INSTANCE, 1)}
    rank1.clear()
    writer1.drain()  # the index at once, the hint on the next flush
    assert client.exists(keys.index(INSTANCE, 1, CPU), keys.heads(INSTANCE, 1, CPU)) == 0
    assert client.hgetall(keys.index(INSTANCE, 0, CPU)) == chunks
    assert client.smembers(keys.heads(INSTANCE, 0, CPU)) == {head}
    assert client.smembers(keys.head(CPU, head)) == {MEMBER}  # rank 0's hint survives rank 1's withdrawal
    rank0.discard(head)  # an eviction on rank 0 withdraws only its own hint too
    rank1.store(prompt, kv(prompt))
    writer0.flush()
    writer1.flush()
    assert client.smembers(keys.head(CPU, head)) == {keys.head_member(INSTANCE, 1)}


def test_a_purge_drops_only_this_rank_s_keys(client: redis.Redis) -> None:
    backend, writer = make(client)
    prompt = list(range(8))
    backend.store(prompt, kv(prompt))
    writer.flush()
    other = IndexWriter(client, INSTANCE, 1)
    LocalCPUBackend(SPACE, 1 << 20, other).store(prompt, kv(prompt))
    other.flush()
    IndexWriter(client, INSTANCE, 1).purge([CPU])  # rank 1 restarted, or is leaving
    assert client.exists(keys.index(INSTANCE, 1, CPU), keys.heads(INSTANCE, 1, CPU)) == 0
    assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 2
    assert client.smembers(keys.head(CPU, SPACE.chunks(prompt)[0].key)) == {MEMBER}


def test_written_within_waits_for_the_thread_and_on_a_stalled_redis_only_once(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    assert server.process is not None
    client = redis_conn.connect(server.url)
    backend, writer = make(client)
    writer.start()
    try:
        first, second, third = list(range(8)), list(range(100, 108)), list(range(200, 208))
        backend.store(first, kv(first))
        assert writer.written_within(1.0)
        assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 2  # current as soon as it returns
        os.kill(server.process.pid, signal.SIGSTOP)
        backend.store(second, kv(second))
        started = time.monotonic()
        assert not writer.written_within(0.3)
        assert 0.3 <= time.monotonic() - started < 0.8
        backend.store(third, kv(third))
        started = time.monotonic()
        assert not writer.written_within(0.3)  # still behind: no second wait
        assert time.monotonic() - started < 0.05
        os.kill(server.process.pid, signal.SIGCONT)
        wait_for(lambda: writer.written_within(0.3), timeout=5, what="the writer to catch up")
        assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 6
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        writer.stop()
        client.close()
        server.kill()


def test_ops_reported_while_a_flush_failed_apply_after_its_ops(fake_server: fakeredis.FakeServer) -> None:
    client = fakeredis.FakeRedis(server=fake_server, decode_responses=True)
    backend, writer = make(client)
    first, second = list(range(8)), list(range(100, 108))
    backend.store(first, kv(first))
    fake_server.connected = False
    with pytest.raises(redis.ConnectionError):
        writer.flush()
    head = SPACE.chunks(first)[0].key
    backend.discard(head)  # after the failed flush: it must not come back when the ops go out
    backend.store(second, kv(second))
    fake_server.connected = True
    writer.flush()
    expected = {c.key for c in SPACE.chunks(first)[1:] + SPACE.chunks(second)}
    assert set(client.hkeys(keys.index(INSTANCE, 0, CPU))) == expected
    assert client.smembers(keys.heads(INSTANCE, 0, CPU)) == {SPACE.chunks(second)[0].key}
    assert client.exists(keys.head(CPU, head)) == 0


def test_a_clear_whose_flush_failed_still_purges_and_keeps_what_came_back(fake_server: fakeredis.FakeServer) -> None:
    client = fakeredis.FakeRedis(server=fake_server, decode_responses=True)
    backend, writer = make(client)
    kept, dropped = list(range(8)), list(range(100, 108))
    backend.store(kept, kv(kept))
    backend.store(dropped, kv(dropped))
    writer.flush()
    backend.clear()
    fake_server.connected = False
    with pytest.raises(redis.ConnectionError):
        writer.flush()
    backend.store(kept, kv(kept))  # back before the clear reached Redis
    fake_server.connected = True
    writer.drain()
    kept_head, dropped_head = SPACE.chunks(kept)[0].key, SPACE.chunks(dropped)[0].key
    assert set(client.hkeys(keys.index(INSTANCE, 0, CPU))) == {c.key for c in SPACE.chunks(kept)}
    assert client.smembers(keys.heads(INSTANCE, 0, CPU)) == {kept_head}
    assert client.smembers(keys.head(CPU, kept_head)) == {MEMBER}
    assert client.exists(keys.head(CPU, dropped_head)) == 0


def test_keys_and_ids_beyond_ascii_are_written_as_given(client: redis.Redis) -> None:
    writer = IndexWriter(client, "instance-é", 0)
    writer.admitted(CPU, IndexEntry("clé-0", 4, True))
    writer.admitted(CPU, IndexEntry("a" * 32, 2, False))
    writer.flush()
    assert client.hgetall(keys.index("instance-é", 0, CPU)) == {"clé-0": "4", "a" * 32: "2"}
    assert client.smembers(keys.head(CPU, "clé-0")) == {keys.head_member("instance-é", 0)}
    writer.purge([CPU])
    assert client.exists(keys.index("instance-é", 0, CPU), keys.head(CPU, "clé-0")) == 0


def test_an_idle_writer_stops_at_once(client: redis.Redis) -> None:
    _, writer = make(client)
    writer.start()
    assert writer.written_within(1.0)
    writer.stop()
    assert not any(t.name.startswith(f"kvbus-index-{INSTANCE}") and t.is_alive() for t in threading.enumerate())


def test_hints_left_to_withdraw_survive_a_failed_flush_and_a_clear_while_it_was_out(client: redis.Redis) -> None:
    backend, writer = make(client)
    prompt = list(range(8))
    backend.store(prompt, kv(prompt))
    writer.flush()
    backend.clear()
    writer.flush()  # the index is gone; withdrawing the hint is pending

    def fails_after_a_clear(deltas: object) -> None:
        backend.clear()  # reported while the flush is out
        raise redis.ConnectionError("Redis went away")

    writer._write = fails_after_a_clear  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        writer.flush()
    del writer._write
    writer.drain()
    assert client.exists(keys.head(CPU, SPACE.chunks(prompt)[0].key)) == 0


def test_a_clear_of_a_location_this_writer_left_empty_costs_redis_nothing(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    backend, writer = make(client)
    prompt = list(range(8))
    backend.store(prompt, kv(prompt))
    writer.flush()
    backend.clear()
    writer.drain()
    client.config_resetstat()
    backend.clear()
    writer.flush()
    backend.store(prompt, kv(prompt))
    backend.clear()  # before the admissions went out: they never reach Redis
    writer.drain()
    assert set(client.info("commandstats")) <= {"cmdstat_config|resetstat", "cmdstat_info"}
    backend.store(prompt, kv(prompt))
    writer.flush()
    backend.clear()
    writer.drain()
    assert client.exists(keys.index(INSTANCE, 0, CPU), keys.heads(INSTANCE, 0, CPU)) == 0
    assert client.exists(keys.head(CPU, SPACE.chunks(prompt)[0].key)) == 0
    client.close()


def test_a_republish_purges_what_redis_holds_whatever_the_writer_left(client: redis.Redis) -> None:
    backend, writer = make(client)
    backend.clear()
    writer.flush()
    client.hset(keys.index(INSTANCE, 0, CPU), "stale", 4)  # e.g. a replica promoted before the purge reached it
    backend.publish_all()  # what the agent does after a failover
    writer.flush()
    assert client.exists(keys.index(INSTANCE, 0, CPU)) == 0


def test_a_clear_after_a_republish_of_held_chunks_purges_them(client: redis.Redis) -> None:
    backend, writer = make(client)
    backend.clear()
    writer.flush()
    prompt = list(range(8))
    backend.store(prompt, kv(prompt))
    backend.publish_all()
    writer.flush()
    backend.clear()
    writer.drain()
    assert client.exists(keys.index(INSTANCE, 0, CPU), keys.head(CPU, SPACE.chunks(prompt)[0].key)) == 0


def test_on_a_cluster_fields_go_to_the_instance_s_node_or_else_by_the_pipeline(
    cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvbus.agent import index_writer

    client = redis_conn.connect(cluster_url)
    assert isinstance(client, redis.cluster.RedisCluster)
    backend, writer = make(client)
    sent: list[redis.Redis] = []
    exchange = index_writer._exchange

    def to_the_node(node: redis.Redis, commands: Iterable[tuple[bytes, int]]) -> list[object]:
        sent.append(node)
        return exchange(node, commands)

    monkeypatch.setattr(index_writer, "_exchange", to_the_node)
    first, second = list(range(8)), list(range(100, 108))
    backend.store(first, kv(first))
    writer.flush()
    assert sent  # straight to the node, not through the pipeline
    assert client.hgetall(keys.index(INSTANCE, 0, CPU)) == {c.key: str(c.num_tokens) for c in SPACE.chunks(first)}

    def node_gone(node: redis.Redis, commands: Iterable[tuple[bytes, int]]) -> list[object]:
        raise redis.ConnectionError("the node went away")

    monkeypatch.setattr(index_writer, "_exchange", node_gone)
    backend.discard(SPACE.chunks(first)[1].key)
    backend.store(second, kv(second))
    writer.flush()
    expected = SPACE.chunks(first)[:1] + SPACE.chunks(second)
    assert client.hgetall(keys.index(INSTANCE, 0, CPU)) == {c.key: str(c.num_tokens) for c in expected}
    assert client.smembers(keys.head(CPU, SPACE.chunks(second)[0].key)) == {MEMBER}
    monkeypatch.undo()
    backend.clear()
    writer.drain()
    assert client.exists(keys.index(INSTANCE, 0, CPU)) == 0
    assert client.exists(keys.head(CPU, SPACE.chunks(first)[0].key)) == 0
    client.close()


def test_a_purge_whose_flush_failed_later_on_still_withdraws_the_hints(client: redis.Redis) -> None:
    backend, writer = make(client)
    first, second = list(range(8)), list(range(100, 108))
    backend.store(first, kv(first))
    writer.flush()
    second_head = keys.head(CPU, SPACE.chunks(second)[0].key)
    client.set(second_head, "not a set")  # its SADD will fail, after the purge went through
    backend.clear()
    backend.store(second, kv(second))
    with pytest.raises(redis.ResponseError):
        writer.flush()
    client.delete(second_head)
    writer.drain()
    assert client.exists(keys.head(CPU, SPACE.chunks(first)[0].key)) == 0
    assert set(client.hkeys(keys.index(INSTANCE, 0, CPU))) == {c.key for c in SPACE.chunks(second)}
    assert client.smembers(second_head) == {MEMBER}


def test_ops_taken_by_a_caller_apply_once_it_hands_back_their_replies(client: redis.Redis) -> None:
    backend, writer = make(client)
    prompt = list(range(8))
    backend.store(prompt, kv(prompt))
    writer.flush()
    head = SPACE.chunks(prompt)[0].key
    backend.clear()
    taken = writer.take()
    assert taken is not None
    own = OwnConnection(client.connection_pool)
    own.send([("PING",)], ahead=taken.commands)
    writer.written(taken, own.read(taken.replies, raise_errors=False))
    assert own.read(1) == ["PONG"]
    assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 0  # in Redis before anything sent after it
    assert client.smembers(keys.head(CPU, head)) == {MEMBER}  # the hint is withdrawn later, as after a flush
    writer.drain()
    assert client.smembers(keys.head(CPU, head)) == set()
    assert writer.take() is None  # a clear of what this writer left empty sends nothing


def test_ops_taken_by_a_caller_whose_write_failed_stay_pending(client: redis.Redis) -> None:
    backend, writer = make(client)
    prompt = list(range(8))
    backend.store(prompt, kv(prompt))
    taken = writer.take()
    assert taken is not None
    later = [50, 51]
    backend.store(later, kv(later))
    writer.not_written(taken)
    writer.flush()
    assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 3


def test_what_the_holder_reports_waits_for_it_and_what_others_report_does_not(client: redis.Redis) -> None:
    backend, writer = make(client)
    writer.start()
    try:
        writer.hold()
        prompt = list(range(8))
        backend.store(prompt, kv(prompt))
        time.sleep(0.05)
        assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 0  # left for the holder to take
        later = [50, 51]
        engine = threading.Thread(target=backend.store, args=(later, kv(later)))
        engine.start()
        engine.join()
        wait_for(lambda: client.hlen(keys.index(INSTANCE, 0, CPU)) == 3, timeout=5, what="background flush")
        writer.hold()
        backend.clear()
        writer.release()
        wait_for(lambda: client.hlen(keys.index(INSTANCE, 0, CPU)) == 0, timeout=5, what="background flush")
    finally:
        writer.stop()


def test_the_holder_s_take_waits_for_a_background_flush_in_flight_that_carries_its_ops(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvbus.agent import index_writer

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    backend, writer = make(client)
    release, flushing = threading.Event(), threading.Event()
    exchange = index_writer._exchange

    def slow(connection: redis.Redis, commands: Iterable[tuple[bytes, int]]) -> list[object]:
        flushing.set()
        release.wait(10)
        return exchange(connection, commands)

    monkeypatch.setattr(index_writer, "_exchange", slow)
    writer.start()
    try:
        writer.hold()
        mine = list(range(8))
        backend.store(mine, kv(mine))  # the holder's: left for it to take
        other = [50, 51]
        engine = threading.Thread(target=backend.store, args=(other, kv(other)))
        engine.start()  # another thread's op wakes the background thread, which takes the holder's with it
        engine.join()
        assert flushing.wait(5)
        taken: list[object] = []
        holder = threading.Thread(target=lambda: taken.append(writer.take()))
        holder.start()
        holder.join(0.3)
        assert holder.is_alive()  # its ops are in flight, not yet in Redis: it may not answer before they are
        release.set()
        holder.join(10)
        assert taken == [None]  # nothing left to send ahead of its answer
        assert client.hlen(keys.index(INSTANCE, 0, CPU)) == 3  # and what it reported is in Redis
    finally:
        release.set()
        writer.stop()
        client.close()
