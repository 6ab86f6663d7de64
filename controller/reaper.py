"""Removes instances whose agents stopped heartbeating long ago, so a fleet that churns does not fill Redis.

Engines that are killed never deregister. Lookups skip them at once (no heartbeat), but
their registration, stream and index would stay forever. Each round, one controller
replica (a lock key with a TTL) removes instances with no heartbeat for `reap_after`
seconds. The script that deletes an instance first checks its heartbeat again, inside
Redis, so an agent that came back is never reaped; one that comes back later finds its
registration gone at its next heartbeat and re-registers and re-publishes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis
import redis.asyncio

from kvbus.controller import fleet
from kvbus.shared import deregistration, keys, redis_conn
from kvbus.shared.locations import FASTEST_FIRST, Location
from kvbus.shared.records import InstanceInfo, LifecycleEntry, LifecycleKind

log = logging.getLogger("kvbus.controller.reaper")

# KEYS: 1 the instance's alive key, then the instance's keys to delete (every rank's index and heads
# keys among them): all in the instance's slot, as a script on Redis Cluster must be. The fleet-wide
# sets are withdrawn from afterwards (see `deregistration`, whose order and race this shares).
_REAP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('UNLINK', unpack(KEYS, 2))
return 1
"""


class Reaper:
    def __init__(self, client: redis_conn.AsyncClient, *, reap_after_s: float) -> None:
        self._redis = client
        self._reap_after = reap_after_s
        self._interval = max(1.0, min(30.0, reap_after_s / 4))
        self._script = client.register_script(_REAP)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """End `run` after the round in hand; rounds are not cancelled midway through a command."""
        self._stopping.set()

    async def run(self) -> None:
        """Reap every interval until `stop`; a failing round is logged and retried."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)
                return
            try:
                if await self._redis.set(keys.REAPER_LOCK, "1", nx=True, ex=max(1, int(self._interval))):
                    await self.reap_once()
            except redis_conn.ERRORS as exc:
                log.warning("reaping skipped this round: %s", exc)

    async def reap_once(self) -> list[str]:
        """Remove every instance silent for `reap_after` seconds; returns their ids."""
        snapshot = await fleet.read(self._redis, backlogs=False, silent_only=True)
        reaped = []
        for instance in snapshot.instances:
            if instance.alive:
                continue
            last_seen = max((w.record.last_heartbeat_time for w in instance.workers), default=0.0)
            silence = time.time() - last_seen
            if silence >= self._reap_after and await self._reap(instance, silence):
                reaped.append(instance.instance_id)
        return reaped

    async def _reap(self, instance: fleet.Instance, silence: float) -> bool:
        instance_id = instance.instance_id
        owned, memberships = await self._keys_of(instance)
        if not await self._script(keys=[keys.alive(instance_id), *owned], args=[]):
            return False
        await deregistration.leave_sets_async(self._redis, instance_id, memberships, last=True)
        ranks = {rank for _, rank in memberships}  # every rank is among them: each leaves kvbus:lmcache:workers
        await self._redis.hdel(keys.fleet_shard(instance_id), *(keys.head_member(instance_id, r) for r in ranks))
        entry = LifecycleEntry(
            kind=LifecycleKind.REAPED, instance_id=instance_id, worker_id=-1, detail=f"no heartbeat for {silence:.0f} s"
        )
        with contextlib.suppress(redis.RedisError):
            await self._redis.xadd(keys.LIFECYCLE, entry.encode(), maxlen=keys.LIFECYCLE_MAXLEN, approximate=True)
        log.warning("reaped instance %s: no heartbeat for %.0f s", instance_id, silence)
        return True

    async def _keys_of(self, instance: fleet.Instance) -> tuple[list[str], list[tuple[str, int]]]:
        """The instance's own keys, every rank's index and heads keys among them, and the (set, rank)
        pairs that withdraw each rank's head hints and LMCache memberships."""
        instance_id = instance.instance_id
        # Every rank that may have keys: the registered ones, including any whose worker hash the read skipped.
        registered = await self._redis.smembers(keys.workers(instance_id))
        ranks = sorted({int(w) for w in registered} | {w.worker_id for w in instance.workers})
        places = [(rank, loc) for rank in ranks for loc in FASTEST_FIRST]
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(keys.info(instance_id), InstanceInfo.SPACE_FIELD)
        for rank, location in places:
            pipe.smembers(keys.heads(instance_id, rank, location))
        space, *heads = await pipe.execute()
        owned = _owned(instance_id, ranks, places)
        # An LMCache worker's rank is also a candidate of its hash space and a member of the relay's set.
        sets = [keys.LMCACHE_WORKERS, *([keys.space_instances(space)] if space else [])]
        listed = [(key, rank) for key in sets for rank in ranks]
        return owned, [*_hints(places, heads), *listed]


def _owned(instance_id: str, ranks: list[int], places: list[tuple[int, Location]]) -> list[str]:
    """Every key of the instance: its own, and each rank's record, index, heads and LMCache state."""
    per_place = [
        key for rank, loc in places for key in (keys.index(instance_id, rank, loc), keys.heads(instance_id, rank, loc))
    ]
    per_rank = [key for rank in ranks for key in (keys.worker(instance_id, rank), keys.lmcache_sync(instance_id, rank))]
    return [keys.info(instance_id), keys.workers(instance_id), keys.commands(instance_id), *per_rank, *per_place]


def _hints(places: list[tuple[int, Location]], heads: list[set[str]]) -> list[tuple[str, int]]:
    """(head set, rank) for each first chunk a rank holds at a location: what withdraws that rank's hint."""
    return [
        (keys.head(location, head), rank) for (rank, location), held in zip(places, heads, strict=True) for head in held
    ]
