from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import fakeredis
import msgspec
import pytest
import redis

from kvbus.agent.registration import Registration, WorkerAddress
from kvbus.shared import keys
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location
from kvbus.shared.records import BackendStats, FleetEntry, InstanceInfo, LifecycleEntry, LifecycleKind, WorkerRecord
from tests.conftest import wait_for_a_beat_waiting

INSTANCE = "inst-r"


def make(
    client: fakeredis.FakeRedis, worker_id: int = 0, stats: Callable[[], dict[str, BackendStats]] | None = None
) -> Registration:
    return Registration(
        client,
        instance_id=INSTANCE,
        worker_id=worker_id,
        space=HashSpace("m", 256),
        locations=[Location.CPU],
        address=WorkerAddress("10.0.0.7", 8001, "10.0.0.7:8200"),
        ttl_s=5,
        stats=stats,
    )


@contextlib.contextmanager
def registered(redis_url: str, *, socket_timeout: float) -> Iterator[tuple[redis.Redis, Registration]]:
    """A client of the test's Redis, and a registration made and registered through it."""
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=socket_timeout)
    try:
        registration = make(client)
        registration.register()
        yield client, registration
    finally:
        client.close()


def test_register_writes_what_controllers_and_operators_read(fake_redis: fakeredis.FakeRedis) -> None:
    make(fake_redis).register()
    assert fake_redis.smembers(keys.INSTANCES) == {INSTANCE}
    assert fake_redis.smembers(keys.HASH_SPACES) == {"256:m"}
    info = InstanceInfo.decode(fake_redis.hgetall(keys.info(INSTANCE)))
    assert info == InstanceInfo(
        model="m", chunk_size=256, save_unfull_chunk=True, locations=["LocalCPUBackend"], hash_space="256:m"
    )
    worker = WorkerRecord.decode(fake_redis.hgetall(keys.worker(INSTANCE, 0)))
    assert (worker.ip, worker.port, worker.peer_init_url) == ("10.0.0.7", 8001, "10.0.0.7:8200")
    assert 0 < fake_redis.pttl(keys.alive(INSTANCE)) <= 5000
    assert LifecycleEntry.decode(fake_redis.xrange(keys.LIFECYCLE)[-1][1]).kind == LifecycleKind.REGISTERED


def test_heartbeat_notices_when_redis_forgot_the_instance(fake_redis: fakeredis.FakeRedis) -> None:
    registration = make(fake_redis)
    registration.register()
    assert registration.heartbeat() is True
    fake_redis.flushall()
    assert registration.heartbeat() is False
    assert fake_redis.exists(keys.alive(INSTANCE)) == 1
    # No fleet entry for a registration Redis lost: the one that follows brings it back.
    assert fake_redis.hgetall(keys.fleet_shard(INSTANCE)) == {}


def test_heartbeat_leaves_the_workers_fleet_entry(fake_redis: fakeredis.FakeRedis) -> None:
    registration = make(fake_redis)
    registration.register()
    fake_redis.hset(keys.index(INSTANCE, 0, "LocalCPUBackend"), mapping={"a" * 32: "256", "b" * 32: "256"})
    fake_redis.xgroup_create(keys.commands(INSTANCE), keys.command_group(0), id="0", mkstream=True)
    fake_redis.xadd(keys.commands(INSTANCE), {"n": "1"})
    before = time.time()
    assert registration.heartbeat() is True
    entry = msgspec.json.decode(fake_redis.hget(keys.fleet_shard(INSTANCE), f"0:{INSTANCE}"), type=FleetEntry)
    assert entry.last_heartbeat_time >= before and entry.ip == "10.0.0.7" and entry.pid == os.getpid()
    assert entry.index == {"LocalCPUBackend": 2}
    assert entry.unacked == 1 and entry.oldest_unacked_ms > 0  # not read yet: its entry id's time


def test_deregister_removes_the_instance(fake_redis: fakeredis.FakeRedis) -> None:
    registration = make(fake_redis)
    registration.register()
    registration.deregister()
    assert fake_redis.smembers(keys.INSTANCES) == set()
    assert fake_redis.exists(keys.info(INSTANCE), keys.alive(INSTANCE), keys.worker(INSTANCE, 0)) == 0
    assert LifecycleEntry.decode(fake_redis.xrange(keys.LIFECYCLE)[-1][1]).kind == LifecycleKind.DEREGISTERED


def test_a_rank_deregistering_takes_only_its_own_index_and_the_last_takes_the_instance(
    fake_redis: fakeredis.FakeRedis,
) -> None:
    ranks = [make(fake_redis, worker_id) for worker_id in (0, 1)]
    for worker_id, registration in enumerate(ranks):
        registration.register()
        fake_redis.hset(keys.index(INSTANCE, worker_id, Location.CPU), "k", 4)
        fake_redis.sadd(keys.heads(INSTANCE, worker_id, Location.CPU), "k")
    assert ranks[1].deregister() is False
    assert fake_redis.exists(keys.index(INSTANCE, 1, Location.CPU), keys.heads(INSTANCE, 1, Location.CPU)) == 0
    assert fake_redis.exists(keys.index(INSTANCE, 0, Location.CPU), keys.heads(INSTANCE, 0, Location.CPU)) == 2
    assert fake_redis.smembers(keys.INSTANCES) == {INSTANCE}
    assert ranks[0].deregister() is True
    assert fake_redis.keys(f"kvbus:{{{INSTANCE}}}:*") == []
    assert fake_redis.smembers(keys.INSTANCES) == set()


def test_a_second_live_agent_for_the_same_worker_is_warned_about(
    fake_redis: fakeredis.FakeRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = WorkerRecord(
        instance_id=INSTANCE, worker_id=0, pid=1, hostname="elsewhere", last_heartbeat_time=time.time()
    )
    fake_redis.hset(keys.worker(INSTANCE, 0), mapping=other.encode())
    make(fake_redis).register()
    assert any("already served by pid 1 on elsewhere" in m for m in caplog.messages)


def test_the_own_connection_beat_writes_the_fleet_entry_the_client_beat_does(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        own, plain = make(client), make(client)
        plain._own = None  # the path a cluster client takes
        own.register()
        client.hset(keys.index(INSTANCE, 0, "LocalCPUBackend"), mapping={"a" * 32: "256"})
        stream, group = keys.commands(INSTANCE), keys.command_group(0)
        client.xgroup_create(stream, group, id="0", mkstream=True)
        client.xadd(stream, {"n": "1"})
        client.xreadgroup(group, group, {stream: ">"})  # one delivered, unacked
        client.xadd(stream, {"n": "2"})  # one not read yet
        entries = []
        for registration in (own, plain):
            assert registration.heartbeat() is True
            raw = client.hget(keys.fleet_shard(INSTANCE), f"0:{INSTANCE}")
            entries.append(msgspec.structs.replace(msgspec.json.decode(raw, type=FleetEntry), last_heartbeat_time=0))
        assert entries[0] == entries[1]
        assert entries[0].index == {"LocalCPUBackend": 1} and entries[0].unacked == 2
        assert entries[0].oldest_unacked_ms > 0
        assert abs(own.now_ms() - plain.now_ms()) < 1000  # both read Redis's clock
        client.delete(stream)  # no group: the backlog reads fail, the beat does not
        assert own.heartbeat() is True
    finally:
        client.close()


def test_registration_is_one_round_trip_on_a_single_redis_and_still_warns_reads_the_clock_and_logs(
    redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        other = WorkerRecord(
            instance_id=INSTANCE, worker_id=0, pid=1, hostname="elsewhere", last_heartbeat_time=time.time()
        )
        client.hset(keys.worker(INSTANCE, 0), mapping=other.encode())
        lifecycle_before = client.xlen(keys.LIFECYCLE)
        registration = make(client)
        writes: list[object] = []
        send = redis.connection.Connection.send_packed_command

        def counted(self: redis.connection.Connection, command: object, check_health: bool = True) -> None:
            writes.append(command)
            send(self, command, check_health)

        monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counted)
        registration.register()
        monkeypatch.undo()
        assert len(writes) == 1
        assert any("already served by pid 1 on elsewhere" in m for m in caplog.messages)
        assert WorkerRecord.decode(client.hgetall(keys.worker(INSTANCE, 0))).pid == os.getpid()
        assert client.xlen(keys.LIFECYCLE) == lifecycle_before + 1
        seconds, micros = client.time()
        assert abs(registration.now_ms() - (seconds * 1000 + micros // 1000)) < 1000
        registration.deregister()
    finally:
        client.close()


def test_a_beat_that_waits_in_redis_runs_after_its_wait_stamped_with_its_due_time(redis_url: str) -> None:
    with registered(redis_url, socket_timeout=5) as (client, registration):
        assert registration.waits_in_redis(2.5) and not registration.waits_in_redis(2.6)  # half the socket timeout
        client.hset(keys.worker(INSTANCE, 0), WorkerRecord.HEARTBEAT_FIELD, "0")
        before = time.time()
        assert registration.heartbeat(wait_s=0.4) is True
        assert time.time() - before >= 0.4  # Redis held the beat for its wait
        beat = WorkerRecord.decode(client.hgetall(keys.worker(INSTANCE, 0))).last_heartbeat_time
        assert before + 0.4 <= beat <= time.time() + 0.4
        assert abs(registration.now_ms() - int(time.time() * 1000)) < 1000  # the clock still read at the beat
        assert client.exists(keys.beat_wake(INSTANCE, 0)) == 0  # a wait leaves nothing behind


def test_wake_ends_a_beat_waiting_in_redis_at_once_or_else_the_next(redis_url: str) -> None:
    with registered(redis_url, socket_timeout=10) as (client, registration):
        outcome: list[bool] = []
        waiting = threading.Thread(target=lambda: outcome.append(registration.heartbeat(wait_s=4.0)))
        waiting.start()
        wait_for_a_beat_waiting(client)
        registration.wake()
        waiting.join(3.0)
        assert outcome == [True], "the woken beat did not run at once"
        registration.wake()  # with no beat waiting: the next one takes the push and beats at once
        assert 0 < client.pttl(keys.beat_wake(INSTANCE, 0)) <= 5000
        outcome.clear()
        waiting = threading.Thread(target=lambda: outcome.append(registration.heartbeat(wait_s=4.0)))
        waiting.start()
        waiting.join(3.0)
        assert outcome == [True] and client.exists(keys.beat_wake(INSTANCE, 0)) == 0


def test_a_cluster_beat_never_waits_in_redis(cluster_url: str) -> None:
    client = redis.RedisCluster.from_url(cluster_url, decode_responses=True)
    try:
        registration = make(client)  # type: ignore[arg-type]
        assert not registration.waits_in_redis(0.001) and registration.waits_in_redis(0.0)
        registration.register()
        assert registration.heartbeat() is True
    finally:
        client.close()


def test_stats_that_change_during_a_beats_wait_go_out_at_once_after_it(redis_url: str) -> None:
    held = [BackendStats(chunks=1, tokens=256, bytes=100, capacity_bytes=1000)]
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=5)
    try:
        registration = make(client, stats=lambda: {"LocalCPUBackend": held[0]})
        registration.register()
        waiting = threading.Thread(target=registration.heartbeat, kwargs={"wait_s": 1.0})
        waiting.start()
        wait_for_a_beat_waiting(client)
        held[0] = BackendStats(chunks=0, tokens=0, bytes=0, capacity_bytes=1000)  # a clear, during the wait
        waiting.join(5.0)
        record = WorkerRecord.decode(client.hgetall(keys.worker(INSTANCE, 0)))
        assert record.stats == {"LocalCPUBackend": held[0]}
        entry = msgspec.json.decode(client.hget(keys.fleet_shard(INSTANCE), f"0:{INSTANCE}"), type=FleetEntry)
        assert entry.stats == {"LocalCPUBackend": held[0]}
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["single", "cluster"])
def test_a_beat_is_quiet_when_it_finds_what_the_last_one_did(backend: str, request: pytest.FixtureRequest) -> None:
    """Quiet: the same stats, index counts and command backlog as the beat before (the agent then beats less)."""
    url = str(request.getfixturevalue("redis_url" if backend == "single" else "cluster_url"))
    client = (redis.Redis if backend == "single" else redis.RedisCluster).from_url(url, decode_responses=True)
    held = [BackendStats(chunks=1, tokens=256, bytes=100, capacity_bytes=1000)]
    try:
        client.xgroup_create(keys.commands(INSTANCE), keys.command_group(0), id="0", mkstream=True)
        registration = make(client, stats=lambda: {"LocalCPUBackend": held[0]})  # type: ignore[arg-type]
        registration.register()
        assert registration.heartbeat()
        assert registration.heartbeat() and registration.quiet
        held[0] = BackendStats(chunks=0, tokens=0, bytes=0, capacity_bytes=1000)  # a clear
        assert registration.heartbeat() and not registration.quiet
        assert registration.heartbeat() and registration.quiet
        client.hset(keys.index(INSTANCE, 0, str(Location.CPU)), "chunk", 256)  # an index write
        assert registration.heartbeat() and not registration.quiet
        assert registration.heartbeat() and registration.quiet
        client.xadd(keys.commands(INSTANCE), {"event_id": "e"})  # a command not read yet
        assert registration.heartbeat() and not registration.quiet
        assert registration.heartbeat() and registration.quiet
        client.delete(keys.info(INSTANCE))  # Redis forgot the instance
        assert not registration.heartbeat() and not registration.quiet
    finally:
        client.close()
