"""An agent's presence in Redis: registration, heartbeat and deregistration, plus Redis's clock.

Command deadlines are counted in Redis server time (stream entry ids), so each heartbeat
also measures how far this host's clock is from Redis's.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import redis

from kvbus.agent.own_connection import Args, OwnConnection
from kvbus.shared import deregistration, fleet_entry, keys, redis_conn
from kvbus.shared.flat_fields import DecodeError
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location
from kvbus.shared.records import (
    BackendStats,
    FleetEntry,
    InstanceInfo,
    LifecycleEntry,
    LifecycleKind,
    WorkerRecord,
)

log = logging.getLogger("kvbus.agent.registration")

# The heartbeat on a single Redis, in one call. KEYS: the alive key, the instance's info, the worker record,
# the command stream, the fleet shard, then the rank's index keys. ARGV: the worker id, the TTL in ms, the
# command group, the fleet entry's field, what the last beat's reads found (`seen`, or empty), the entry
# built from them, then the worker record's heartbeat fields. Refreshes liveness; unless Redis lost the
# instance (info or record gone: the agent re-registers), rewrites the record, makes fleet_entry's reads
# and, if they find what `seen` says, writes the entry, which is then exact. Returns Redis's clock, what
# the reads found (nil when the instance is lost), whether the entry was written, then the reads.
_BEAT = (
    fleet_entry.READS_LUA
    + """
local now = redis.call('TIME')
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('EXISTS', KEYS[2], KEYS[3]) ~= 2 then return {now[1], now[2], false, 0} end
redis.call('HSET', KEYS[3], unpack(ARGV, 7))
local reads = fleet_reads({unpack(KEYS, 6)}, KEYS[4], ARGV[3])
local seen, written = cjson.encode(reads), 0
if seen == ARGV[5] then
  redis.call('HSET', KEYS[5], ARGV[4], ARGV[6])
  written = 1
end
return {now[1], now[2], seen, written, unpack(reads)}
"""
)

StatsByLocation = dict[str, BackendStats]

WAKE = "stop"  # what `wake` pushes


@dataclass(frozen=True)
class WorkerAddress:
    host: str
    port: int | None
    peer_init_url: str | None


class Registration:
    def __init__(
        self,
        client: redis_conn.Client,
        *,
        instance_id: str,
        worker_id: int,
        space: HashSpace,
        locations: list[Location],
        address: WorkerAddress,
        ttl_s: float,
        layout: str | None = None,
        stats: Callable[[], StatsByLocation] | None = None,
    ) -> None:
        self._redis = client
        self._instance = instance_id
        self._worker = worker_id
        self._space = space
        self._locations = locations
        self.address = address
        self._ttl_ms = int(ttl_s * 1000)
        # What the bytes of this worker's chunks mean (model, dtype, block size, attention backend),
        # for engines that store their own paged blocks; readers load only chunks of their layout.
        self._layout = layout
        # Only the agent knows what its backends hold in bytes; dashboards read it from the worker hash.
        self._stats = stats
        self._clock_offset_ms = 0
        self.registered_at = time.time()
        # The heartbeat thread's, on a single Redis: a beat a second costs an idle engine its CPU.
        self._own: OwnConnection | None = None
        self._own_turn = threading.Lock()
        self._longest_wait_s = 0.0  # what `heartbeat` may wait in Redis: nothing on a cluster
        if isinstance(client, redis.Redis):
            self._own = OwnConnection(client.connection_pool)
            # A beat's wait and its reply come within the connection's socket timeout, with room to spare.
            timeout_s = client.connection_pool.connection_kwargs.get("socket_timeout")
            self._longest_wait_s = timeout_s / 2 if timeout_s else float("inf")
        self._published: FleetEntry | None = None  # the fleet entry this worker wrote last
        self._seen = ""  # what the reads it came from found, as the beat script spells it (JSON)
        self._stats_sent: StatsByLocation | None = None  # what the worker record has, as the own beat wrote it
        self._last_found: tuple[StatsByLocation | None, fleet_entry.Found] | None = None  # the cluster beat's
        # Whether the last beat found what the one before it did: stats, index counts and command backlog (the
        # heartbeat thread then beats less often).
        self.quiet = False
        self._wake_key = keys.beat_wake(instance_id, worker_id)
        beat_keys = (
            keys.alive(instance_id),
            keys.info(instance_id),
            keys.worker(instance_id, worker_id),
            keys.commands(instance_id),
            keys.fleet_shard(instance_id),
            *(keys.index(instance_id, worker_id, str(location)) for location in locations),
        )
        # What starts every call of `_BEAT`: the script, its keys and its first four arguments.
        self._beat_start: Args = (
            "EVAL",
            _BEAT,
            len(beat_keys),
            *beat_keys,
            worker_id,
            self._ttl_ms,
            keys.command_group(worker_id),
            keys.head_member(instance_id, worker_id),
        )

    def waits_in_redis(self, seconds: float) -> bool:
        """Whether `heartbeat` can wait `seconds` in Redis before it beats: on a single Redis (the heartbeat's own
        connection), for waits well within the connection's socket timeout."""
        return seconds <= self._longest_wait_s

    def wake(self) -> None:
        """End the wait of a `heartbeat` under way now, or else the next one's at once: for a stopping agent. The
        push expires with the heartbeat TTL, in case no heartbeat takes it. Raises redis.RedisError."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.lpush(self._wake_key, WAKE)
        pipe.pexpire(self._wake_key, self._ttl_ms)
        pipe.execute()

    def now_ms(self) -> int:
        """Redis server time, in ms, as estimated at the last heartbeat."""
        return int(time.time() * 1000) + self._clock_offset_ms

    def register(self) -> None:
        """Write this worker's registration. One round trip on a single Redis: the read of who held the worker
        before, the writes, the clock and the lifecycle entry go in one pipeline, in that order (a cluster
        pipeline takes no TIME, so a cluster asks for the clock after)."""
        record = WorkerRecord(
            instance_id=self._instance,
            worker_id=self._worker,
            ip=self.address.host,
            port=self.address.port,
            peer_init_url=self.address.peer_init_url or "",
            pid=os.getpid(),
            hostname=socket.gethostname(),
            registration_time=self.registered_at,
            last_heartbeat_time=time.time(),
            layout=self._layout or "",
        )
        info = InstanceInfo(
            model=self._space.model,
            chunk_size=self._space.chunk_size,
            save_unfull_chunk=self._space.save_unfull_chunk,
            locations=[str(loc) for loc in self._locations],
            hash_space=self._space.name,
        )
        one_redis = isinstance(self._redis, redis.Redis)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(keys.worker(self._instance, self._worker))  # read before the writes below replace it
        pipe.sadd(keys.INSTANCES, self._instance)
        pipe.sadd(keys.HASH_SPACES, self._space.name)
        if self._locations:
            pipe.sadd(keys.LOCATIONS, *self._locations)
        pipe.hset(keys.info(self._instance), mapping=info.encode())
        # Replaced whole: a field this registration leaves at its default must not survive from an earlier one.
        pipe.delete(keys.worker(self._instance, self._worker))
        pipe.hset(keys.worker(self._instance, self._worker), mapping=record.encode())
        pipe.sadd(keys.workers(self._instance), self._worker)
        pipe.set(keys.alive(self._instance), self._worker, px=self._ttl_ms)
        if one_redis:
            pipe.time()
        self._add_lifecycle(pipe, LifecycleKind.REGISTERED, f"pid {os.getpid()} on {socket.gethostname()}")
        before = time.time()
        replies = pipe.execute()
        if one_redis:
            self._set_clock(replies[-2], before, time.time())
        else:
            self._sync_clock()
        self._stats_sent = None
        self._warn_if_claimed(replies[0])

    def _warn_if_claimed(self, fields: dict[str, str]) -> None:
        """Two live agents under one (instance, worker) would split its commands between them; `fields` is the
        worker's record as it was before this registration."""
        try:
            claimed = WorkerRecord.decode(fields)
        except DecodeError:
            return  # nothing registered there, or nothing readable: nobody to warn about
        if claimed.pid is None or (claimed.pid, claimed.hostname) == (os.getpid(), socket.gethostname()):
            return
        age = time.time() - claimed.last_heartbeat_time
        if age < self._ttl_ms / 1000:
            log.warning(
                "instance %s worker %d is already served by pid %s on %s (heartbeat %.1f s ago); "
                "give each engine its own lmcache_instance_id or worker id",
                self._instance,
                self._worker,
                claimed.pid,
                claimed.hostname,
                age,
            )

    def heartbeat(self, wait_s: float = 0.0) -> bool:
        """Refresh liveness and this worker's fleet entry; False when Redis no longer knows this instance (it
        restarted, or was flushed): the entry then waits for the registration that follows.

        `wait_s`: beat that long from now, or at `wake`, waiting in Redis (where `waits_in_redis`). The beat goes
        out at once behind a BLPOP of that long, and Redis runs it when the BLPOP ends and answers both together:
        the thread wakes once a beat, by its socket, where sleeping first woke it twice, once by a timer: eight
        idle agents beside eight that slept first used 0.033 against 0.042 % of a core each. The beat is stamped
        with the time it is due. Its stats are those of when it went out: should they change during the wait,
        a beat with those of now follows at once, so that the entry's stats and index are of one moment."""
        assert wait_s <= self._longest_wait_s, "the wait must be one waits_in_redis allows"
        self.quiet = False
        if self._own is not None:
            # The heartbeat thread's beat waits on the own connection; another caller's beat (a test's, say)
            # takes its turn after it, and its stamp and stats are of its turn.
            with self._own_turn:
                return self._beat_own(self._own, wait_s)
        now = time.time()
        stats = self._stats() if self._stats is not None else None
        locations = [str(location) for location in self._locations]
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(keys.alive(self._instance), self._worker, px=self._ttl_ms)
        pipe.exists(keys.info(self._instance), keys.worker(self._instance, self._worker))
        pipe.hset(keys.worker(self._instance, self._worker), mapping=WorkerRecord.heartbeat(now, stats))
        fleet_entry.queue_reads(pipe, self._instance, self._worker, locations)
        # Only the backlog reads may fail (no group yet); an error of the heartbeat's own writes is raised.
        replies = pipe.execute(raise_on_error=False)
        for reply in replies[:3]:
            if isinstance(reply, Exception):
                raise reply
        known = replies[1] == 2
        if known:
            found = fleet_entry.found(iter(replies[3:]), self._worker, locations)
            self.quiet = (stats, found) == self._last_found
            self._last_found = (stats, found)
            self._publish(now, stats, found)
        self._sync_clock()  # a call of its own: a cluster pipeline takes no TIME
        return known

    def _beat_own(self, own: OwnConnection, wait_s: float) -> bool:
        """`heartbeat` on the own connection, in one script call (`_BEAT`): the same writes and reads, and the
        clock. When the reads find what the last beat's did, the script writes the fleet entry built from them,
        which is then exact, so an idle agent's beat is one round trip; otherwise the entry follows."""
        now = time.time() + wait_s
        stats = self._stats() if self._stats is not None else None
        locations = [str(location) for location in self._locations]
        entry = self._entry(now, stats) if self._published is not None else None
        # Stats the record has already are not sent again: an idle engine's stay the same for hours.
        changed = stats != self._stats_sent
        record = WorkerRecord.heartbeat(now, stats if changed else None)
        beat: Args = (
            *self._beat_start,
            self._seen if entry is not None else "",
            entry.encode() if entry is not None else "",
            *(str(v) for item in record.items() for v in item),
        )
        # BLPOP's 0 would wait for good; the timeout is in seconds, to the ms.
        commands = [("BLPOP", self._wake_key, f"{wait_s:.3f}"), beat] if wait_s >= 0.001 else [beat]
        before = time.time()
        *waited, answer = own.batch(commands, raise_errors=False)
        after = time.time()
        if waited and isinstance(waited[0], redis.ResponseError):
            self._refused_wait(waited[0])  # the beat itself ran at once
        if isinstance(answer, redis.ResponseError):
            raise answer
        seconds, micros, seen, written, *reads = answer
        # After a wait, the script ran just before the answer came: as if sent then.
        self._set_clock((int(seconds), int(micros)), after if len(commands) > 1 else before, after)
        if seen is None:
            return False
        self._seen, self._stats_sent = seen, stats
        if not written:
            *counts, groups, pending = reads
            found = fleet_entry.found(iter([*counts, _groups(groups), _pending(pending)]), self._worker, locations)
            self._publish(now, stats, found)
        if wait_s and self._stats is not None and self._stats() != stats:
            return self._beat_own(own, 0.0)  # what the backends hold changed during the wait
        self.quiet = bool(written) and not changed  # written: the reads found what the last beat's did
        return True

    def _refused_wait(self, error: redis.ResponseError) -> None:
        """Redis refused a beat's wait (an ACL without BLPOP, or something else stored at the wake key): the beats
        sleep before they go from now on, rather than fail every other time."""
        self._longest_wait_s = 0.0
        log.warning(
            "Redis refused the heartbeat's wait on %s (%s); heartbeats sleep on their own from now on, at some "
            "CPU cost to an idle engine: allow BLPOP on that key, or delete what is stored there, then restart",
            self._wake_key,
            error,
        )

    def _publish(self, now: float, stats: StatsByLocation | None, found: fleet_entry.Found) -> None:
        """Write the entry /metrics and the dashboard read: a field of a fleet-wide hash, in another slot."""
        oldest = found.oldest_unacked_ms
        if found.after is not None:
            pipe = self._redis.pipeline(transaction=False)
            fleet_entry.queue_first_after(pipe, self._instance, found.after)
            oldest = fleet_entry.first_ms(pipe.execute()[0])
        self._published = FleetEntry(
            last_heartbeat_time=now,
            ip=self.address.host,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            stats=stats,
            index=found.index,
            unacked=found.unacked,
            oldest_unacked_ms=oldest,
        )
        entry = self._published.encode()
        field = keys.head_member(self._instance, self._worker)
        if self._own is not None:
            self._own.call("HSET", keys.fleet_shard(self._instance), field, entry)
        else:
            self._redis.hset(keys.fleet_shard(self._instance), field, entry)

    def _entry(self, now: float, stats: StatsByLocation | None) -> FleetEntry:
        """The last entry published, as of now: exact for as long as the reads it came from find the same."""
        assert self._published is not None
        return msgspec.structs.replace(self._published, last_heartbeat_time=now, stats=stats)

    def deregister(self) -> bool:
        """Remove this worker and its index; the instance goes with its last worker. True if this was the last.

        The index keys are normally empty by now: the agent purges them first (`IndexWriter.purge`),
        which also withdraws this rank's head hints; removing them here keeps a bare deregistration whole.
        """
        rank_keys = [
            self._wake_key,
            *(
                key
                for location in self._locations
                for key in (
                    keys.index(self._instance, self._worker, location),
                    keys.heads(self._instance, self._worker, location),
                )
            ),
        ]
        last = deregistration.deregister(self._redis, self._instance, self._worker, own=rank_keys)
        self.lifecycle(LifecycleKind.DEREGISTERED, "clean shutdown" + (", last worker of the instance" if last else ""))
        return last

    def lifecycle(self, kind: LifecycleKind, detail: str) -> None:
        self._add_lifecycle(self._redis, kind, detail)

    def _add_lifecycle(self, to: redis_conn.Client | redis_conn.Pipeline, kind: LifecycleKind, detail: str) -> None:
        """XADD the lifecycle entry, now on a client or queued on a pipeline."""
        entry = LifecycleEntry(kind=kind, instance_id=self._instance, worker_id=self._worker, detail=detail)
        to.xadd(keys.LIFECYCLE, entry.encode(), maxlen=keys.LIFECYCLE_MAXLEN, approximate=True)

    def _sync_clock(self) -> None:
        before = time.time()
        server_time = self._redis.time()
        self._set_clock(server_time, before, time.time())

    def _set_clock(self, server_time: tuple[int, int], before: float, after: float) -> None:
        seconds, micros = server_time
        self._clock_offset_ms = int((seconds + micros / 1e6 - (before + after) / 2) * 1000)


def _groups(reply: Any) -> Any:
    """XINFO GROUPS as redis-py gives it: each group's fields as a dict (an error stays as it is). RESP2
    lists a group's fields and values flat, RESP3 gives a map."""
    if not isinstance(reply, list):
        return reply
    return [group if isinstance(group, dict) else dict(zip(group[::2], group[1::2], strict=True)) for group in reply]


def _pending(reply: Any) -> Any:
    """XPENDING's summary as redis-py gives it (an error stays as it is)."""
    if not isinstance(reply, list):
        return reply
    count, first, last, _ = reply
    return {"pending": count, "min": first, "max": last}
