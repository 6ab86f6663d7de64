"""Instances silent for `reap_after` seconds are removed whole; live or recently seen ones are not."""

from __future__ import annotations

import asyncio

import redis

from kvbus.controller.reaper import Reaper
from kvbus.shared import keys, redis_conn
from kvbus.shared.locations import Location
from kvbus.shared.records import LifecycleEntry, LifecycleKind
from tests.conftest import SEED_TOKENS
from tests.controller.test_lookup import PROMPT, SPACE, hold
from tests.shared.test_deregistration import on_distinct_masters

REDIS_BACKENDS = ("single", "cluster")


def reap(url: str, reap_after_s: float) -> list[str]:
    async def once() -> list[str]:
        client = await redis_conn.connect_async(url)
        try:
            return await Reaper(client, reap_after_s=reap_after_s).reap_once()
        finally:
            await client.aclose()

    return asyncio.run(once())


def silence(client: redis.Redis, instance_id: str, seconds: float) -> None:
    client.delete(keys.alive(instance_id))
    for worker_id in client.smembers(keys.workers(instance_id)):
        last = float(client.hget(keys.worker(instance_id, int(worker_id)), "last_heartbeat_time") or 0)
        client.hset(keys.worker(instance_id, int(worker_id)), "last_heartbeat_time", last - seconds)


def test_an_instance_silent_past_reap_after_is_removed_whole(redis_url: str, real_redis: redis.Redis) -> None:
    hold(redis_url, "gone", PROMPT)
    hold(redis_url, "peer", PROMPT)
    silence(real_redis, "gone", 700)
    head = keys.head(Location.CPU, SPACE.chunks(PROMPT)[0].key)
    assert reap(redis_url, 600) == ["gone"]
    assert real_redis.smembers(keys.INSTANCES) == {"peer"}
    assert real_redis.smembers(head) == {keys.head_member("peer", 0)}
    assert list(real_redis.scan_iter("kvbus:{gone}:*")) == []
    entry = LifecycleEntry.decode(real_redis.xrange(keys.LIFECYCLE)[-1][1])
    assert (entry.kind, entry.instance_id, entry.worker_id) == (LifecycleKind.REAPED, "gone", -1)


def test_every_rank_s_index_heads_and_hints_are_removed(redis_url: str, real_redis: redis.Redis) -> None:
    for rank in (0, 1, 2):
        hold(redis_url, "tp", PROMPT[: 256 * (rank + 1)], worker_id=rank)
    hold(redis_url, "peer", PROMPT)
    # Rank 2's worker hash is unreadable: the fleet read skips it, its keys must go all the same.
    real_redis.hset(keys.worker("tp", 2), "worker_id", "not a number")
    head = keys.head(Location.CPU, SPACE.chunks(PROMPT)[0].key)
    assert real_redis.smembers(head) == {"0:tp", "1:tp", "2:tp", "0:peer"}
    silence(real_redis, "tp", 700)
    assert reap(redis_url, 600) == ["tp"]
    assert real_redis.smembers(head) == {"0:peer"}
    assert list(real_redis.scan_iter("kvbus:{tp}:*")) == []
    assert real_redis.hlen(keys.index("peer", 0, Location.CPU)) == 4


def test_live_and_recently_seen_instances_stay(redis_url: str, real_redis: redis.Redis) -> None:
    hold(redis_url, "live", SEED_TOKENS)
    hold(redis_url, "resting", SEED_TOKENS)
    silence(real_redis, "resting", 30)
    assert reap(redis_url, 600) == []
    assert real_redis.smembers(keys.INSTANCES) == {"live", "resting"}
    assert real_redis.hlen(keys.index("resting", 0, Location.CPU)) == 1


def test_a_heartbeat_arriving_before_the_script_saves_the_instance(redis_url: str, real_redis: redis.Redis) -> None:
    hold(redis_url, "back", SEED_TOKENS)
    silence(real_redis, "back", 700)

    async def race() -> list[str]:
        client = await redis_conn.connect_async(redis_url)
        reaper = Reaper(client, reap_after_s=600)
        original = reaper._script

        async def heartbeat_first(**kwargs: object) -> object:
            real_redis.set(keys.alive("back"), 0, ex=5)  # the agent heartbeats just in time
            return await original(**kwargs)

        reaper._script = heartbeat_first  # type: ignore[assignment]
        try:
            return await reaper.reap_once()
        finally:
            await client.aclose()

    assert asyncio.run(race()) == []
    assert real_redis.sismember(keys.INSTANCES, "back")
    assert real_redis.hlen(keys.index("back", 0, Location.CPU)) == 1


def test_silent_instances_on_different_masters_are_each_reaped_whole(redis_url: str, real_redis: redis.Redis) -> None:
    silent, live = on_distinct_masters(real_redis, 3), "peer"
    for instance_id in [*silent, live]:
        hold(redis_url, instance_id, PROMPT)
    for instance_id in silent:
        silence(real_redis, instance_id, 700)
    head = keys.head(Location.CPU, SPACE.chunks(PROMPT)[0].key)
    assert sorted(reap(redis_url, 600)) == sorted(silent)
    assert real_redis.smembers(keys.INSTANCES) == {live}
    assert real_redis.smembers(head) == {keys.head_member(live, 0)}
    for instance_id in silent:
        assert list(real_redis.scan_iter(f"kvbus:{{{instance_id}}}:*")) == []
