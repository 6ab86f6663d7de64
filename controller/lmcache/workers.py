"""What LMCache workers' messages do in Redis: the same registration and index kvbus's own agents write.

So `/lookup`, the worker queries, `/metrics`, the dashboard and every controller replica see LMCache
workers next to kvbus agents, and a controller that dies takes nothing with it: a worker that
reconnects to another replica carries on where it was.

Differences from an agent, all forced by what LMCache reports: chunk keys are in LMCache's hash
space (its workers send bare chunk hashes), so the instance is listed in that space's candidate
set rather than in head hints; the index holds 0 as a chunk's token count (LMCache does not say);
and ops arrive numbered, so a lost op is noticed (see `records.LMCacheSync`).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time

import redis
import redis.asyncio

from kvbus.controller import fleet
from kvbus.controller.lmcache import wire
from kvbus.shared import deregistration, keys, redis_conn
from kvbus.shared.config import valid_instance_id
from kvbus.shared.flat_fields import DecodeError, encode_some
from kvbus.shared.hashing import LMCacheHashSpace
from kvbus.shared.locations import FASTEST_FIRST, KNOWN, Location
from kvbus.shared.records import (
    InstanceInfo,
    LifecycleEntry,
    LifecycleKind,
    LMCacheSync,
    WorkerProtocol,
    WorkerRecord,
)

log = logging.getLogger("kvbus.controller.lmcache")

_LOCATIONS = frozenset(str(location) for location in Location)
_OP_CODES = {wire.OpType.ADMIT: "a", wire.OpType.EVICT: "e"}

# KEYS: the worker's sync record, then its index at the batch's location. ARGV: the names of the
# record's seq, gaps and resync_reason fields, the location, the first and last op numbers, then
# ("a" | "e", chunk key) per op. A gap (or a batch that skips numbers) drops the rank's index there
# and marks the worker for a full sync; otherwise the ops apply in order. Returns 1 on a gap.
_APPLY = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local seq = raw and cjson.decode(raw) or {}
local first, last = tonumber(ARGV[5]), tonumber(ARGV[6])
local previous = seq[ARGV[4]]
local gap = (previous ~= nil and first ~= previous + 1) or (last - first + 1) * 2 ~= #ARGV - 6
seq[ARGV[4]] = last
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(seq))
if gap then
  redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
  redis.call('HSET', KEYS[1], ARGV[3], 'seq_gap')
  redis.call('DEL', KEYS[2])
  return 1
end
for i = 7, #ARGV, 2 do
  if ARGV[i] == 'a' then redis.call('HSET', KEYS[2], ARGV[i + 1], '0') else redis.call('HDEL', KEYS[2], ARGV[i + 1]) end
end
return 0
"""


class LMCacheWorkers:
    def __init__(
        self, client: redis_conn.AsyncClient, space: LMCacheHashSpace, *, heartbeat_ttl_s: float, heartbeat_url: str
    ) -> None:
        self._redis = client
        self.space = space
        self._ttl_ms = int(heartbeat_ttl_s * 1000)
        self._heartbeat_url = heartbeat_url  # empty: no heartbeat socket, so workers never heartbeat
        self._apply_sha = hashlib.sha1(_APPLY.encode()).hexdigest()
        self._unknown_locations: set[str] = set()

    async def register(self, message: wire.RegisterMsg | wire.HeartbeatMsg) -> wire.RegisterRetMsg:
        """A worker that (re)starts holds nothing yet: its rank's index and op numbers start empty."""
        instance, worker = message.instance_id, message.worker_id
        if not valid_instance_id(instance):
            # The one rule every registering instance follows; the worker is told nothing and times out.
            raise wire.WireError(f"instance id {instance!r} breaks kvbus's rule for instance ids; not registered")
        now = time.time()
        record = WorkerRecord(
            instance_id=instance,
            worker_id=worker,
            protocol=WorkerProtocol.LMCACHE,
            ip=message.ip,
            port=message.port,
            peer_init_url=message.peer_init_url or "",
            hostname=socket.gethostname() if message.ip in ("127.0.0.1", "localhost") else "",
            registration_time=now,
            last_heartbeat_time=now,
        )
        info = InstanceInfo(
            model="",
            chunk_size=self.space.chunk_size,
            save_unfull_chunk=self.space.save_unfull_chunk,
            locations=[str(loc) for loc in FASTEST_FIRST],
            hash_space=self.space.name,
        )
        pipe = self._redis.pipeline(transaction=False)
        pipe.sadd(keys.INSTANCES, instance)
        pipe.sadd(keys.HASH_SPACES, self.space.name)
        pipe.sadd(keys.space_instances(self.space.name), keys.head_member(instance, worker))
        # LMCache's CPU and disk backends are the ones that report what they hold.
        pipe.sadd(keys.LOCATIONS, Location.CPU, Location.DISK)
        pipe.hset(keys.info(instance), mapping=info.encode())
        pipe.delete(keys.worker(instance, worker), keys.lmcache_sync(instance, worker))
        pipe.delete(*(keys.index(instance, worker, location) for location in FASTEST_FIRST))
        pipe.hset(keys.worker(instance, worker), mapping=record.encode())
        pipe.sadd(keys.workers(instance), worker)
        pipe.set(keys.alive(instance), worker, px=self._ttl_ms)
        pipe.sadd(keys.LMCACHE_WORKERS, keys.head_member(instance, worker))
        pipe.xadd(
            keys.LIFECYCLE,
            LifecycleEntry(
                kind=LifecycleKind.REGISTERED,
                instance_id=instance,
                worker_id=worker,
                detail=f"LMCache worker at {message.ip}:{message.port}",
            ).encode(),
            maxlen=keys.LIFECYCLE_MAXLEN,
            approximate=True,
        )
        await pipe.execute()
        # The group the relaying controllers read this worker's commands through, as an agent's own.
        try:
            await self._redis.xgroup_create(keys.commands(instance), keys.command_group(worker), id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await fleet.publish(self._redis, [(instance, worker)])  # what /metrics and the dashboard show of it
        log.info("LMCache worker %s/%d registered from %s:%d", instance, worker, message.ip, message.port)
        return wire.RegisterRetMsg(extra_config={"heartbeat_url": self._heartbeat_url} if self._heartbeat_url else {})

    async def heartbeat(self, message: wire.HeartbeatMsg) -> wire.HeartbeatRetMsg:
        """Refresh liveness; a worker Redis does not know is registered again and asked for all it holds."""
        instance, worker = message.instance_id, message.worker_id
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(keys.worker(instance, worker))
        pipe.hget(keys.lmcache_sync(instance, worker), LMCacheSync.SCRIPT_FIELDS[2])
        known, resync = await pipe.execute()
        if not known:
            await self.register(message)
            return wire.HeartbeatRetMsg(commands=[wire.FullSyncCommand(reason="worker_re_registered")])
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(keys.alive(instance), worker, px=self._ttl_ms)
        pipe.hset(keys.worker(instance, worker), mapping=WorkerRecord.heartbeat(time.time(), None))
        await pipe.execute()
        await fleet.publish(self._redis, [(instance, worker)])
        return wire.HeartbeatRetMsg(commands=[wire.FullSyncCommand(reason=resync)] if resync else [])

    async def deregister(self, message: wire.DeRegisterMsg) -> None:
        instance, worker = message.instance_id, message.worker_id
        own = [keys.lmcache_sync(instance, worker), *(keys.index(instance, worker, loc) for loc in FASTEST_FIRST)]
        last = await deregistration.deregister_async(
            self._redis,
            instance,
            worker,
            own=own,
            memberships=[keys.space_instances(self.space.name), keys.LMCACHE_WORKERS],
        )
        log.info("LMCache worker %s/%d deregistered%s", instance, worker, ", the last of its instance" if last else "")

    async def apply(self, batches: list[wire.BatchedKVOperationMsg]) -> None:
        """Admit and evict each batch's chunks in its rank's index, in order, unless ops were lost; one round trip."""
        applied = [b for b in batches if b.operations and self._known(b.location)]
        if not applied:
            return
        try:
            gaps = await self._apply_all(applied)
        except redis.exceptions.NoScriptError:  # Redis restarted and forgot the script: load it, run again
            await self._redis.script_load(_APPLY)
            gaps = await self._apply_all(applied)
        for batch, gap in zip(applied, gaps, strict=True):
            if gap:
                self._log_gap(batch)

    async def _apply_all(self, batches: list[wire.BatchedKVOperationMsg]) -> list[int]:
        # EVALSHA straight into the pipeline: redis-py's script objects would ask SCRIPT EXISTS first,
        # a round trip per pipeline that costs as much as the ops themselves.
        pipe = self._redis.pipeline(transaction=False)
        for batch in batches:
            ops = [part for op in batch.operations for part in (_OP_CODES[op.op_type], LMCacheHashSpace.key(op.key))]
            pipe.evalsha(
                self._apply_sha,
                2,
                keys.lmcache_sync(batch.instance_id, batch.worker_id),
                keys.index(batch.instance_id, batch.worker_id, batch.location),
                *LMCacheSync.SCRIPT_FIELDS,
                batch.location,
                batch.operations[0].seq_num,
                batch.operations[-1].seq_num,
                *ops,
            )
        return list(await pipe.execute())

    def _log_gap(self, batch: wire.BatchedKVOperationMsg) -> None:
        log.warning(
            "LMCache worker %s/%d lost ops at %s (sequence gap before op %d): its index there is dropped "
            "and it is asked for a full sync at its next heartbeat%s",
            batch.instance_id,
            batch.worker_id,
            batch.location,
            batch.operations[0].seq_num,
            "" if self._heartbeat_url else " (none configured: give the controller a heartbeat port)",
        )

    async def start_sync(self, message: wire.FullSyncStartMsg) -> wire.FullSyncStartRetMsg:
        """A full sync replaces what the rank's index says it holds at the location."""
        if not self._known(message.location):
            return wire.FullSyncStartRetMsg(sync_id=message.sync_id, accepted=False, error_msg="unknown location")
        instance, worker = message.instance_id, message.worker_id
        state = encode_some(
            LMCacheSync,
            sync_id=message.sync_id,
            sync_location=message.location,
            sync_batches=message.batch_count,
            sync_received=[],
            sync_ended=False,
        )
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(keys.index(instance, worker, message.location))
        pipe.hset(keys.lmcache_sync(instance, worker), mapping=state)
        await pipe.execute()
        log.info("LMCache worker %s/%d full sync %s of %s started", instance, worker, message.sync_id, message.location)
        return wire.FullSyncStartRetMsg(sync_id=message.sync_id, accepted=True)

    async def sync_batch(self, message: wire.FullSyncBatchMsg) -> None:
        state = await self._state(message.instance_id, message.worker_id)
        if state.sync_id != message.sync_id or not self._known(message.location):
            return  # a batch of a sync that was superseded
        pipe = self._redis.pipeline(transaction=False)
        index = keys.index(message.instance_id, message.worker_id, message.location)
        for start in range(0, len(message.keys), 1000):
            pipe.hset(index, mapping={LMCacheHashSpace.key(k): "0" for k in message.keys[start : start + 1000]})
        received = sorted({*state.sync_received, message.batch_id})
        pipe.hset(
            keys.lmcache_sync(message.instance_id, message.worker_id),
            mapping=encode_some(LMCacheSync, sync_received=received),
        )
        await pipe.execute()

    async def end_sync(self, message: wire.FullSyncEndMsg) -> None:
        state = await self._state(message.instance_id, message.worker_id)
        if state.sync_id == message.sync_id:
            await self._redis.hset(
                keys.lmcache_sync(message.instance_id, message.worker_id),
                mapping=encode_some(LMCacheSync, sync_ended=True),
            )

    async def sync_status(self, message: wire.FullSyncStatusMsg) -> wire.FullSyncStatusRetMsg:
        """kvbus keeps its index across restarts, so only this worker's own sync decides when it may unfreeze."""
        state = await self._state(message.instance_id, message.worker_id)
        if state.sync_id != message.sync_id:
            return wire.FullSyncStatusRetMsg(
                sync_id=message.sync_id, is_complete=False, global_progress=0.0, can_exit_freeze=True
            )
        missing = state.missing_batches
        complete = state.sync_complete
        if complete and state.resync_reason:
            await self._redis.hset(
                keys.lmcache_sync(message.instance_id, message.worker_id),
                mapping=encode_some(LMCacheSync, resync_reason=""),
            )
        progress = 1.0 if not state.sync_batches else len(state.sync_received) / state.sync_batches
        return wire.FullSyncStatusRetMsg(
            sync_id=message.sync_id,
            is_complete=complete,
            global_progress=min(progress, 1.0),
            can_exit_freeze=complete,
            missing_batches=missing,
        )

    async def _state(self, instance: str, worker: int) -> LMCacheSync:
        try:
            return LMCacheSync.decode(await self._redis.hgetall(keys.lmcache_sync(instance, worker)))
        except DecodeError:
            return LMCacheSync()

    def _known(self, location: str) -> bool:
        if location in _LOCATIONS:
            return True
        if location not in self._unknown_locations:
            self._unknown_locations.add(location)
            log.warning("LMCache reports chunks at %s, which kvbus does not index (it knows %s)", location, KNOWN)
        return False
