"""The controller's one read of the fleet (fleet.py) against a real redis-server, with real agents: instances,
workers and their records, index sizes per location, command backlogs, and what a partial registration leaves."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import redis

from kvbus.agent.agent import Agent
from kvbus.controller import fleet
from kvbus.controller.fleet import Backlog, Fleet
from kvbus.shared import keys, redis_conn
from kvbus.shared.config import KVBusConfig
from kvbus.shared.flat_fields import encode
from kvbus.shared.locations import Location
from kvbus.shared.messages import Command, CommandKind
from tests.conftest import MODEL
from tests.controller.test_lookup import hold, place
from tests.controller.test_routes import BASE, INSTANCE, PROMPT, store

CPU, DISK, GPU = (str(location) for location in (Location.CPU, Location.DISK, Location.GPU))


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


def read(url: str, only: str | None = None, *, backlogs: bool = True, silent_only: bool = False) -> Fleet:
    async def once() -> Fleet:
        client = await redis_conn.connect_async(url)
        try:
            return await fleet.read(client, only, backlogs=backlogs, silent_only=silent_only)
        finally:
            await client.aclose()

    return asyncio.run(once())


def test_instances_are_read_with_their_workers_records_and_liveness(
    redis_url: str, config: KVBusConfig, ranks: list[Agent]
) -> None:
    hold(redis_url, "dead", PROMPT, alive=False)
    snapshot = read(redis_url)
    assert [i.instance_id for i in snapshot.instances] == ["dead", INSTANCE]
    assert snapshot.locations == [CPU]
    tp = snapshot.instance(INSTANCE)
    assert tp is not None and tp.alive
    assert [w.worker_id for w in tp.workers] == [0, 1]
    for worker, agent in zip(tp.workers, ranks, strict=True):
        record = worker.record
        assert (record.instance_id, record.ip, record.port, record.peer_init_url) == (INSTANCE, "127.0.0.1", None, "")
        assert (record.pid, record.hostname) == (os.getpid(), socket.gethostname())
        assert record.registration_time == agent.registration.registered_at
        assert worker.heartbeat_age_s is not None and worker.alive(config.heartbeat_ttl)
    dead = snapshot.instance("dead")
    assert dead is not None and not dead.alive and [w.worker_id for w in dead.workers] == [0]
    assert snapshot.instance("ghost") is None and tp.worker(5) is None


def test_each_instance_has_its_index_size_at_every_location_the_fleet_uses(redis_url: str, ranks: list[Agent]) -> None:
    store(ranks[0], PROMPT)
    place(redis_url, "tiered", PROMPT, [(Location.CPU, Location.GPU), (Location.CPU,), (Location.DISK,)])
    snapshot = read(redis_url)
    assert snapshot.locations == [CPU, DISK, GPU]
    tiered, tp = snapshot.instance("tiered"), snapshot.instance(INSTANCE)
    assert tiered is not None and tiered.index == {CPU: 2, DISK: 1, GPU: 1} and tiered.key_count == 4
    # Each rank has its own index: rank 0 stored the prompt, rank 1 nothing.
    assert tp is not None and [w.index for w in tp.workers] == [{CPU: 3, DISK: 0, GPU: 0}, {CPU: 0, DISK: 0, GPU: 0}]
    assert [w.key_count for w in tp.workers] == [3, 0]
    assert tp.index == {CPU: 3, DISK: 0, GPU: 0} and tp.key_count == 3


def test_an_instance_s_index_sizes_are_its_workers_summed(redis_url: str, ranks: list[Agent]) -> None:
    store(ranks[0], PROMPT)
    store(ranks[1], PROMPT[:512])
    tp = read(redis_url).instance(INSTANCE)
    assert tp is not None and [w.index for w in tp.workers] == [{CPU: 3}, {CPU: 2}]
    assert [w.key_count for w in tp.workers] == [3, 2]
    # As LMCache counts: a chunk both ranks hold counts once per rank.
    assert tp.index == {CPU: 5} and tp.key_count == 5


def test_a_silent_workers_backlog_counts_unread_and_unacked_commands_from_the_oldest(
    redis_url: str, real_redis: redis.Redis, config: KVBusConfig, silent: Agent
) -> None:
    Agent(config, model=MODEL, worker_id=1).registration.register()
    seconds, _ = real_redis.time()
    stream, group = keys.commands(INSTANCE), keys.command_group(0)
    # Entry ids are Redis time: dating them back gives ages without waiting.
    for event_id, sent_s in (("Clear-hour-old", seconds - 3600), ("Clear-minute-old", seconds - 60)):
        command = Command(event_id=event_id, kind=CommandKind.CLEAR, reply_to="nobody", timeout_ms=500, location=CPU)
        real_redis.xadd(stream, encode(command), id=f"{sent_s * 1000}-0")

    def backlog(worker_id: int = 0) -> Backlog | None:
        instance = read(redis_url).instance(INSTANCE)
        worker = instance.worker(worker_id) if instance is not None else None
        assert worker is not None
        return worker.backlog

    assert backlog(1) is None  # registered without a command group: nothing to count against
    unread = backlog()
    assert unread is not None and unread.unacked == 2 and unread.oldest_age_s >= 3600
    [(_, [(first, _)])] = real_redis.xreadgroup(group, group, {stream: ">"}, count=1)
    stuck = backlog()  # read but never acked, as by an agent stuck on it
    assert stuck is not None and stuck.unacked == 2 and stuck.oldest_age_s >= 3600
    real_redis.xack(stream, group, first)
    one_left = backlog()
    assert one_left is not None and one_left.unacked == 1 and 60 <= one_left.oldest_age_s < 3600
    [(_, [(second, _)])] = real_redis.xreadgroup(group, group, {stream: ">"}, count=1)
    real_redis.xack(stream, group, second)
    assert backlog() == Backlog(unacked=0, oldest_age_s=0.0)


def test_only_reads_one_instance_and_backlogs_can_be_left_out(redis_url: str, ranks: list[Agent]) -> None:
    hold(redis_url, "other", PROMPT)
    assert [i.instance_id for i in read(redis_url, INSTANCE).instances] == [INSTANCE]
    assert [i.instance_id for i in read(redis_url, "other").instances] == ["other"]
    nobody = read(redis_url, "ghost")
    assert nobody.instances == [] and nobody.locations == [CPU]
    with_backlogs, without = read(redis_url), read(redis_url, backlogs=False)
    assert [w.backlog for i in with_backlogs.instances for w in i.workers] == [
        None,  # "other" has no command group: nothing ever read its stream
        Backlog(0, 0.0),
        Backlog(0, 0.0),
    ]
    assert [w.backlog for i in without.instances for w in i.workers] == [None, None, None]
    assert [(i.instance_id, i.index, [w.worker_id for w in i.workers]) for i in without.instances] == [
        (i.instance_id, i.index, [w.worker_id for w in i.workers]) for i in with_backlogs.instances
    ]


def test_silent_only_reads_just_the_instances_without_a_heartbeat_whole(redis_url: str, ranks: list[Agent]) -> None:
    hold(redis_url, "dead", PROMPT, alive=False)
    hold(redis_url, "other", PROMPT)
    everyone = read(redis_url, backlogs=False)
    silent = read(redis_url, backlogs=False, silent_only=True)
    assert [i.instance_id for i in everyone.instances] == ["dead", "other", INSTANCE]

    def whole(instances: list[fleet.Instance]) -> list[tuple[str, bool, list[tuple[object, dict[str, int]]]]]:
        return [(i.instance_id, i.alive, [(w.record, w.index) for w in i.workers]) for i in instances]

    assert whole(silent.instances) == whole([i for i in everyone.instances if i.instance_id == "dead"])
    assert silent.instances[0].workers  # its records and index sizes too, not just its id
    assert silent.locations == everyone.locations
    assert read(redis_url, INSTANCE, silent_only=True).instances == []


def test_a_worker_whose_hash_is_gone_or_unreadable_is_skipped_and_a_gone_stream_has_no_backlog(
    redis_url: str, real_redis: redis.Redis, config: KVBusConfig
) -> None:
    # Registered but not started: no heartbeat thread puts a hash back meanwhile.
    for worker_id in (0, 1, 2, 3):
        registered = Agent(config, model=MODEL, worker_id=worker_id)
        registered.registration.register()
        registered.consumer.ensure_group()
    real_redis.delete(keys.worker(INSTANCE, 1))  # deregistered between the two reads
    real_redis.hset(keys.worker(INSTANCE, 2), "worker_id", "not a number")
    real_redis.hdel(keys.worker(INSTANCE, 3), "last_heartbeat_time")
    instance = read(redis_url).instance(INSTANCE)
    assert instance is not None and [w.worker_id for w in instance.workers] == [0, 3]
    assert instance.workers[0].backlog == Backlog(0, 0.0)
    never_beat = instance.workers[1]
    assert never_beat.heartbeat_age_s is None and not never_beat.alive(config.heartbeat_ttl)
    real_redis.delete(keys.commands(INSTANCE))  # the last worker is deregistering
    instance = read(redis_url).instance(INSTANCE)
    assert instance is not None and [w.backlog for w in instance.workers] == [None, None]
