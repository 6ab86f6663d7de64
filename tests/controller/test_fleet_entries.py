"""The fleet as /metrics and the dashboard read it (fleet.read_entries): the entries workers' heartbeats leave in
the fleet hashes, on one Redis and on a Redis Cluster. Agents write their own (agent/registration.py);
controllers write LMCache workers' (fleet.publish)."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from kvbus.agent.registration import Registration, WorkerAddress
from kvbus.controller import fleet
from kvbus.controller.fleet import Backlog, Fleet
from kvbus.shared import keys, redis_conn
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location
from kvbus.shared.records import BackendStats, FleetEntry, LMCacheSync, WorkerProtocol, WorkerRecord
from tests.conftest import MODEL

REDIS_BACKENDS = ("single", "cluster")
CPU = str(Location.CPU)
STATS = {CPU: BackendStats(chunks=3, tokens=600, bytes=4096, capacity_bytes=2**30)}


def registration(client: redis_conn.Client, instance_id: str, worker_id: int = 0) -> Registration:
    return Registration(
        client,
        instance_id=instance_id,
        worker_id=worker_id,
        space=HashSpace(MODEL, 256),
        locations=[Location.CPU],
        address=WorkerAddress("10.1.2.3", None, None),
        ttl_s=5.0,
        stats=lambda: STATS,
    )


def entries(url: str, *, reap_after_s: float = 3600.0) -> Fleet:
    async def once() -> Fleet:
        client = await redis_conn.connect_async(url)
        try:
            return await fleet.read_entries(client, heartbeat_ttl_s=5.0, reap_after_s=reap_after_s)
        finally:
            await client.aclose()

    return asyncio.run(once())


def publish(url: str, workers: list[tuple[str, int]]) -> None:
    async def once() -> None:
        client = await redis_conn.connect_async(url)
        try:
            await fleet.publish(client, workers)
        finally:
            await client.aclose()

    asyncio.run(once())


def test_a_heartbeat_leaves_what_a_scrape_shows_of_its_worker(redis_url: str) -> None:
    client = redis_conn.connect(redis_url)
    ranks = [registration(client, "inst-tp", rank) for rank in (1, 0)]
    for rank in ranks:
        rank.register()
    client.hset(keys.index("inst-tp", 0, CPU), mapping={f"{n:032x}": 256 for n in range(3)})
    client.xgroup_create(keys.commands("inst-tp"), keys.command_group(0), id="0", mkstream=True)
    assert entries(redis_url).instances == []  # registered, no heartbeat yet
    for rank in ranks:
        assert rank.heartbeat()
    (instance,) = entries(redis_url).instances
    assert instance.instance_id == "inst-tp" and instance.alive
    assert [w.worker_id for w in instance.workers] == [0, 1]
    first, second = instance.workers
    assert first.index == {CPU: 3} and second.index == {CPU: 0} and instance.key_count == 3
    assert first.record.stats == STATS and first.alive(5.0)
    assert (first.record.ip, first.record.pid, first.record.hostname) == ("10.1.2.3", os.getpid(), socket.gethostname())
    assert first.backlog == Backlog(0, 0.0) and second.backlog is None  # rank 1 has no consumer group


def test_the_backlog_counts_unread_and_unacked_commands_from_the_oldest(redis_url: str) -> None:
    client = redis_conn.connect(redis_url)
    rank = registration(client, "inst-busy")
    rank.register()
    stream, group = keys.commands("inst-busy"), keys.command_group(0)
    client.xgroup_create(stream, group, id="0", mkstream=True)
    for n in range(2):
        client.xadd(stream, {"n": str(n)})
    time.sleep(0.05)
    rank.heartbeat()
    backlog = entries(redis_url).instances[0].workers[0].backlog
    assert backlog is not None and backlog.unacked == 2 and backlog.oldest_age_s >= 0.05  # neither read yet
    client.xreadgroup(group, group, {stream: ">"}, count=1)  # read, never acked: pending
    rank.heartbeat()
    pending = entries(redis_url).instances[0].workers[0].backlog
    assert pending is not None and pending.unacked == 2 and pending.oldest_age_s >= backlog.oldest_age_s


def test_entries_spread_over_shards_and_leave_out_the_unregistered_and_the_long_silent(redis_url: str) -> None:
    client = redis_conn.connect(redis_url)
    ids = [f"inst-{n:02d}" for n in range(12)]
    for instance_id in ids:
        rank = registration(client, instance_id)
        rank.register()
        rank.heartbeat()
    assert len({keys.fleet_shard(i) for i in ids}) > 1  # no one key holds the fleet
    assert [i.instance_id for i in entries(redis_url).instances] == ids
    client.srem(keys.INSTANCES, ids[0])  # deregistered between two heartbeats
    silent = FleetEntry(last_heartbeat_time=time.time() - 100)
    client.hset(keys.fleet_shard(ids[1]), keys.head_member(ids[1], 0), silent.encode())
    client.hset(keys.fleet_shard(ids[2]), keys.head_member(ids[2], 0), "{not json")
    shown = entries(redis_url, reap_after_s=50)
    assert [i.instance_id for i in shown.instances] == ids[3:]
    assert client.hexists(keys.fleet_shard(ids[1]), keys.head_member(ids[1], 0)) == 0  # forgotten by the reader
    assert client.hexists(keys.fleet_shard(ids[0]), keys.head_member(ids[0], 0)) == 1  # its deregistration's


def test_an_lmcache_workers_entry_is_written_by_the_controller_with_its_sync_state(redis_url: str) -> None:
    client = redis_conn.connect(redis_url)
    record = WorkerRecord(
        instance_id="lmc", worker_id=0, protocol=WorkerProtocol.LMCACHE, ip="10.0.0.9", last_heartbeat_time=time.time()
    )
    client.sadd(keys.INSTANCES, "lmc")
    client.hset(keys.worker("lmc", 0), mapping=record.encode())
    client.hset(keys.lmcache_sync("lmc", 0), mapping=LMCacheSync(gaps=2, sync_id="s1", sync_batches=3).encode())
    client.hset(keys.index("lmc", 0, CPU), mapping={f"{n:032x}": 0 for n in range(5)})
    publish(redis_url, [("lmc", 0), ("gone", 3)])  # a worker deregistered meanwhile is skipped
    (instance,) = entries(redis_url).instances
    (worker,) = instance.workers
    assert worker.record.protocol == WorkerProtocol.LMCACHE and worker.record.ip == "10.0.0.9"
    assert worker.index[CPU] == 5 and worker.lmcache is not None and worker.lmcache.gaps == 2
    assert worker.lmcache.missing_batches == [0, 1, 2] and worker.backlog is None
