"""A rank leaving (shared/deregistration.py): its own keys in one script over its instance's slot, then the
fleet-wide sets in other slots; on one Redis and on a cluster, for agents and for LMCache workers alike."""

from __future__ import annotations

import asyncio
import itertools

import redis
import redis.cluster

from kvbus.agent.registration import Registration, WorkerAddress
from kvbus.controller.lmcache import wire
from kvbus.controller.lmcache.workers import LMCacheWorkers
from kvbus.shared import deregistration, keys, redis_conn
from kvbus.shared.hashing import HashSpace, LMCacheHashSpace
from kvbus.shared.locations import Location

REDIS_BACKENDS = ("single", "cluster")

SPACE = HashSpace("m", 256)
LMCACHE = LMCacheHashSpace(256, 0)


def on_distinct_masters(client: redis.Redis | redis.cluster.RedisCluster, count: int) -> list[str]:
    """`count` instance ids whose keys live on `count` different masters of a cluster (any ids on one Redis)."""
    candidates = (f"inst-{n}" for n in itertools.count())
    if not isinstance(client, redis.cluster.RedisCluster):
        return list(itertools.islice(candidates, count))
    by_master: dict[str, str] = {}
    for candidate in candidates:
        by_master.setdefault(client.get_node_from_key(keys.info(candidate)).name, candidate)
        if len(by_master) == count:
            return list(by_master.values())
    raise AssertionError("unreachable: the candidates never end")


def agent(client: redis_conn.Client, instance_id: str, worker_id: int = 0) -> Registration:
    return Registration(
        client,
        instance_id=instance_id,
        worker_id=worker_id,
        space=SPACE,
        locations=[Location.CPU],
        address=WorkerAddress("127.0.0.1", None, None),
        ttl_s=60,
    )


def test_agents_of_instances_on_different_masters_each_take_only_their_own(
    redis_url: str, real_redis: redis.Redis
) -> None:
    client = redis_conn.connect(redis_url)
    ids = on_distinct_masters(real_redis, 3)
    ranks = {instance_id: [agent(client, instance_id, rank) for rank in (0, 1)] for instance_id in ids}
    for instance_id, registrations in ranks.items():
        for rank, registration in enumerate(registrations):
            registration.register()
            real_redis.hset(keys.index(instance_id, rank, Location.CPU), "k", 4)
    leaving, staying = ids[:2], ids[2]
    for instance_id in leaving:
        assert ranks[instance_id][1].deregister() is False
        assert real_redis.smembers(keys.INSTANCES) >= {instance_id}
        assert ranks[instance_id][0].deregister() is True
        assert list(real_redis.scan_iter(f"kvbus:{{{instance_id}}}:*")) == []
    assert real_redis.smembers(keys.INSTANCES) == {staying}
    assert real_redis.hlen(keys.index(staying, 1, Location.CPU)) == 1
    client.close()


def test_lmcache_workers_on_different_masters_leave_the_relay_s_and_their_space_s_sets(
    redis_url: str, real_redis: redis.Redis
) -> None:
    ids = on_distinct_masters(real_redis, 3)

    async def register_then_leave() -> None:
        client = await redis_conn.connect_async(redis_url)
        workers = LMCacheWorkers(client, LMCACHE, heartbeat_ttl_s=30, heartbeat_url="")
        for instance_id in ids:
            await workers.register(wire.RegisterMsg(instance_id=instance_id, worker_id=0, ip="127.0.0.1", port=1))
        for instance_id in ids[:2]:
            await workers.deregister(wire.DeRegisterMsg(instance_id=instance_id, worker_id=0, ip="127.0.0.1", port=1))
        await client.aclose()

    asyncio.run(register_then_leave())
    staying = keys.head_member(ids[2], 0)
    assert real_redis.smembers(keys.INSTANCES) == {ids[2]}
    assert real_redis.smembers(keys.LMCACHE_WORKERS) == {staying}
    assert real_redis.smembers(keys.space_instances(LMCACHE.name)) == {staying}
    assert not any(real_redis.exists(keys.worker(instance_id, 0)) for instance_id in ids[:2])


def test_a_rank_registering_again_between_the_steps_keeps_its_memberships(
    redis_url: str, real_redis: redis.Redis
) -> None:
    client = redis_conn.connect(redis_url)
    (instance_id,) = on_distinct_masters(real_redis, 1)
    registration = agent(client, instance_id)
    registration.register()
    member_of = keys.space_instances(SPACE.name)
    script_keys, args = deregistration.script_args(instance_id, 0, own=[])
    assert client.eval(deregistration.SCRIPT, len(script_keys), *script_keys, *args) == 1
    registration.register()  # back before the fleet-wide step ran
    real_redis.sadd(member_of, keys.head_member(instance_id, 0))
    deregistration.leave_sets(client, instance_id, [(member_of, 0)], last=True)
    assert real_redis.sismember(keys.INSTANCES, instance_id)
    assert real_redis.sismember(member_of, keys.head_member(instance_id, 0))
    client.close()


def test_an_lmcache_rank_that_is_not_the_last_leaves_its_own_memberships_only(
    redis_url: str, real_redis: redis.Redis
) -> None:
    async def two_ranks_then_one_leaves() -> None:
        client = await redis_conn.connect_async(redis_url)
        workers = LMCacheWorkers(client, LMCACHE, heartbeat_ttl_s=30, heartbeat_url="")
        for rank in (0, 1):
            await workers.register(wire.RegisterMsg(instance_id="tp", worker_id=rank, ip="127.0.0.1", port=1))
        await workers.deregister(wire.DeRegisterMsg(instance_id="tp", worker_id=1, ip="127.0.0.1", port=1))
        await client.aclose()

    asyncio.run(two_ranks_then_one_leaves())
    assert real_redis.smembers(keys.INSTANCES) == {"tp"}
    assert real_redis.smembers(keys.LMCACHE_WORKERS) == {keys.head_member("tp", 0)}
    assert real_redis.smembers(keys.space_instances(LMCACHE.name)) == {keys.head_member("tp", 0)}
    assert real_redis.smembers(keys.workers("tp")) == {"0"}
