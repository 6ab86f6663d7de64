"""The fleet as Redis holds it right now: the only code in the controller that reads registrations.

Worker queries, key stats, move's peer lookup, the reaper, /metrics and the dashboard are all
views over one `Fleet`, read one of two ways:

- `read`, exact: three pipelined round trips whatever the fleet's size: the registered ids, then
  per instance its workers, liveness (and command backlog when asked), then each worker's record
  and index sizes (each rank has an index of its own). What the queries and the reaper use.
- `read_entries`, for /metrics and the dashboard: one round trip over the `keys.FLEET_SHARDS`
  hashes where each worker's heartbeat leaves its `FleetEntry`, nothing per instance, so a scrape
  of 10,000 instances reads 32 keys. Its values are as of each worker's last heartbeat. Agents
  write their own entries; `publish` writes LMCache workers', which the controller heartbeats.

Ages are in Redis server time, which also stamps the command stream's entry ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvbus.shared import fleet_entry, keys, redis_conn
from kvbus.shared.flat_fields import DecodeError
from kvbus.shared.locations import FASTEST_FIRST
from kvbus.shared.records import FleetEntry, LMCacheSync, WorkerRecord


@dataclass(frozen=True)
class Backlog:
    """Commands on the instance's stream that one worker has not acked, read or not."""

    unacked: int
    oldest_age_s: float  # 0 when there are none


@dataclass(frozen=True)
class Worker:
    record: WorkerRecord
    heartbeat_age_s: float | None  # None before the first heartbeat time is written
    backlog: Backlog | None  # None while the worker has no consumer group on the stream, or not asked for
    index: dict[str, int] = field(default_factory=dict)  # location -> chunks this rank has indexed there
    lmcache: LMCacheSync | None = None  # an LMCache worker's op numbering and full-sync state

    @property
    def worker_id(self) -> int:
        return self.record.worker_id

    @property
    def key_count(self) -> int:
        """Chunks this rank has indexed, over all locations: LMCache's per-worker key count."""
        return sum(self.index.values())

    def alive(self, heartbeat_ttl_s: float) -> bool:
        return self.heartbeat_age_s is not None and self.heartbeat_age_s <= heartbeat_ttl_s


@dataclass(frozen=True)
class Instance:
    instance_id: str
    alive: bool  # its heartbeat key exists: what /lookup requires
    workers: list[Worker]

    @property
    def index(self) -> dict[str, int]:
        """Location -> chunks indexed there, summed over the instance's workers (each rank has its own index)."""
        totals: dict[str, int] = {}
        for worker in self.workers:
            for location, chunks in worker.index.items():
                totals[location] = totals.get(location, 0) + chunks
        return totals

    @property
    def key_count(self) -> int:
        """Chunks indexed over all locations, summed over workers as LMCache sums its workers' key counts."""
        return sum(w.key_count for w in self.workers)

    def worker(self, worker_id: int) -> Worker | None:
        return next((w for w in self.workers if w.worker_id == worker_id), None)


@dataclass(frozen=True)
class Fleet:
    now_s: float  # Redis server time of the read
    locations: list[str]
    instances: list[Instance]

    def instance(self, instance_id: str) -> Instance | None:
        return next((i for i in self.instances if i.instance_id == instance_id), None)


async def read(
    client: redis_conn.AsyncClient, only: str | None = None, *, backlogs: bool = True, silent_only: bool = False
) -> Fleet:
    """The registered instances (or just `only`, if registered), with their workers and, if asked, backlogs.

    `silent_only`: just the instances without a heartbeat, found with one EXISTS each, where reading an
    instance whole takes several commands per worker (what the reaper needs of a fleet that is mostly alive).
    """
    pipe = client.pipeline(transaction=False)
    pipe.smembers(keys.INSTANCES)
    pipe.smembers(keys.LOCATIONS)
    (registered, known_locations), now_ms = await asyncio.gather(pipe.execute(), redis_conn.server_ms(client))
    ids = sorted(registered) if only is None else [only] if only in registered else []
    if silent_only:
        ids = await _silent(client, ids)
    locations = sorted(known_locations)
    states = await _read_instances(client, ids, backlogs)
    records = await _read_workers(client, states, locations)
    instances = [_instance(state, records, now_ms) for state in states]
    return Fleet(now_ms / 1000, locations, instances)


async def _silent(client: redis_conn.AsyncClient, ids: list[str]) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for instance_id in ids:
        pipe.exists(keys.alive(instance_id))
    return [instance_id for instance_id, alive in zip(ids, await pipe.execute(), strict=True) if not alive]


@dataclass
class _InstanceState:
    instance_id: str
    alive: bool
    worker_ids: list[int]
    groups: dict[str, _Group] | None  # None when backlogs were not asked for


@dataclass(frozen=True)
class _Group:
    pending: int  # delivered, not acked
    undelivered: int
    last_delivered: str

    @property
    def unacked(self) -> int:
        return self.pending + self.undelivered


async def _read_instances(client: redis_conn.AsyncClient, ids: list[str], backlogs: bool) -> list[_InstanceState]:
    pipe = client.pipeline(transaction=False)
    for instance_id in ids:
        pipe.smembers(keys.workers(instance_id))
        pipe.exists(keys.alive(instance_id))
        if backlogs:
            pipe.xlen(keys.commands(instance_id))
            pipe.xinfo_groups(keys.commands(instance_id))
    # XINFO GROUPS fails on an instance whose stream is gone (it is deregistering): no backlog then.
    replies = iter(await pipe.execute(raise_on_error=False))
    states = []
    for instance_id in ids:
        worker_ids = sorted(int(w) for w in next(replies))
        alive = bool(next(replies))
        groups = _groups(next(replies), next(replies)) if backlogs else None
        states.append(_InstanceState(instance_id, alive, worker_ids, groups))
    return states


def _groups(length: int, reply: list[dict[str, Any]] | Exception) -> dict[str, _Group]:
    if isinstance(reply, Exception):
        return {}
    groups = {}
    for group in reply:
        # Redis leaves the lag unknown only after XDEL, which kvbus never sends; the stream's length
        # bounds it then. Trimming can also leave it above the length: trimmed entries cannot be read.
        lag = group.get("lag")
        undelivered = length if lag is None else min(int(lag), length)
        groups[group["name"]] = _Group(int(group["pending"]), undelivered, group["last-delivered-id"])
    return groups


@dataclass(frozen=True)
class _WorkerRead:
    record: WorkerRecord | None  # None when the hash is gone (deregistered meanwhile) or unreadable
    index: dict[str, int]
    oldest_unacked_ms: int | None
    lmcache: LMCacheSync | None


async def _read_workers(
    client: redis_conn.AsyncClient, states: list[_InstanceState], locations: list[str]
) -> dict[tuple[str, int], _WorkerRead]:
    pipe = client.pipeline(transaction=False)
    asked_oldest: list[bool] = []
    for state in states:
        for worker_id in state.worker_ids:
            pipe.hgetall(keys.worker(state.instance_id, worker_id))
            for location in locations:
                pipe.hlen(keys.index(state.instance_id, worker_id, location))
            pipe.hgetall(keys.lmcache_sync(state.instance_id, worker_id))
            asked_oldest.append(_ask_oldest(pipe, state, worker_id))
    replies = iter(await pipe.execute())
    asked = iter(asked_oldest)
    reads = {}
    for state in states:
        for worker_id in state.worker_ids:
            record = _record(next(replies))
            index = {location: next(replies) for location in locations}
            lmcache = _sync_state(next(replies))
            oldest = _entry_ms(next(replies)) if next(asked) else None
            reads[(state.instance_id, worker_id)] = _WorkerRead(record, index, oldest, lmcache)
    return reads


def _ask_oldest(pipe: redis_conn.AsyncPipeline, state: _InstanceState, worker_id: int) -> bool:
    """Queue the read of the worker's oldest unacked command, if it has any; True if queued."""
    group = (state.groups or {}).get(keys.command_group(worker_id))
    if group is None or not group.unacked:
        return False
    stream = keys.commands(state.instance_id)
    if group.pending:
        pipe.xpending(stream, keys.command_group(worker_id))
    else:
        # Nothing delivered is pending, so the oldest unacked entry is the first one not yet read.
        pipe.xrange(stream, min=f"({group.last_delivered}", count=1)
    return True


def _sync_state(fields: dict[str, str]) -> LMCacheSync | None:
    try:
        return LMCacheSync.decode(fields) if fields else None
    except DecodeError:
        return None


def _record(fields: dict[str, str]) -> WorkerRecord | None:
    try:
        return WorkerRecord.decode(fields) if fields else None
    except DecodeError:
        return None


def _instance(state: _InstanceState, reads: dict[tuple[str, int], _WorkerRead], now_ms: int) -> Instance:
    workers = []
    for worker_id in state.worker_ids:
        read = reads[(state.instance_id, worker_id)]
        if read.record is None:
            continue
        backlog = _backlog(state, worker_id, read, now_ms)
        workers.append(Worker(read.record, _age(read.record, now_ms), backlog, read.index, read.lmcache))
    return Instance(state.instance_id, state.alive, workers)


def _backlog(state: _InstanceState, worker_id: int, read: _WorkerRead, now_ms: int) -> Backlog | None:
    group = (state.groups or {}).get(keys.command_group(worker_id))
    if group is None:
        return None
    oldest_s = max(0.0, (now_ms - read.oldest_unacked_ms) / 1000) if read.oldest_unacked_ms is not None else 0.0
    return Backlog(group.unacked, oldest_s)


def _entry_ms(reply: dict[str, Any] | list[tuple[str, dict[str, str]]]) -> int | None:
    """The ms part of the oldest entry id in an XPENDING summary or a one-entry XRANGE."""
    entry_id = reply.get("min") if isinstance(reply, dict) else (reply[0][0] if reply else None)
    return int(entry_id.split("-", 1)[0]) if entry_id else None


def _age(record: WorkerRecord, now_ms: int) -> float | None:
    # The agent writes its own clock's time; a skew against Redis's clock would read as a negative age.
    beat = record.last_heartbeat_time
    return max(0.0, now_ms / 1000 - beat) if beat else None


_ENTRY = msgspec.json.Decoder(FleetEntry)
_ENTRIES = msgspec.json.Decoder(list[FleetEntry])


async def read_entries(client: redis_conn.AsyncClient, *, heartbeat_ttl_s: float, reap_after_s: float) -> Fleet:
    """The fleet as its workers' last heartbeats left it in the fleet hashes: what /metrics and the dashboard show.

    An instance is alive while one of its workers heartbeated within `heartbeat_ttl_s` (what keeps its
    heartbeat key). Entries of instances no longer registered are left out, and entries silent for
    `reap_after_s` (the reaper's bound: their instance is gone or about to go) are left out and deleted.
    """
    pipe = client.pipeline(transaction=False)
    pipe.smembers(keys.INSTANCES)
    pipe.smembers(keys.LOCATIONS)
    for shard in keys.fleet_shards():
        pipe.hgetall(shard)
    (registered, known_locations, *shards), now_ms = await asyncio.gather(pipe.execute(), redis_conn.server_ms(client))
    now_s = now_ms / 1000
    by_instance: dict[str, list[Worker]] = {}
    stale: list[tuple[str, str]] = []
    for shard, fields in zip(keys.fleet_shards(), shards, strict=True):
        for name, instance_id, worker_id, entry in _entries(fields, registered):
            if now_s - entry.last_heartbeat_time > reap_after_s:
                stale.append((shard, name))
            else:
                by_instance.setdefault(instance_id, []).append(_worker(instance_id, worker_id, entry, now_s))
    if stale:
        await _forget(client, stale)
    instances = [
        Instance(i, any(w.alive(heartbeat_ttl_s) for w in ws), sorted(ws, key=_worker_id) if len(ws) > 1 else ws)
        for i, ws in sorted(by_instance.items())
    ]
    return Fleet(now_s, sorted(known_locations), instances)


def _worker_id(worker: Worker) -> int:
    return worker.worker_id


def _entries(fields: dict[str, str], registered: set[str]) -> list[tuple[str, str, int, FleetEntry]]:
    """(field, instance id, worker id, entry) for each readable entry of a registered instance in one fleet hash."""
    holders = [(name, keys.head_holder(name)) for name in fields]
    named = [(name, *holder) for name, holder in holders if holder is not None and holder[0] in registered]
    values = [fields[name] for name, _, _ in named]
    try:
        # One decode for the whole hash: value by value costs several times more at 10,000 instances.
        entries: list[FleetEntry | None] = list(_ENTRIES.decode("[" + ",".join(values) + "]"))
    except msgspec.DecodeError:
        entries = [_decoded(value) for value in values]  # one bad value must not hide the rest
    return [(*held, entry) for held, entry in zip(named, entries, strict=True) if entry is not None]


def _decoded(value: str) -> FleetEntry | None:
    try:
        return _ENTRY.decode(value)
    except msgspec.DecodeError:
        return None  # written by another version, or damaged: the scrape shows what it can


def _worker(instance_id: str, worker_id: int, entry: FleetEntry, now_s: float) -> Worker:
    record = WorkerRecord(
        instance_id=instance_id,
        worker_id=worker_id,
        protocol=entry.protocol,
        ip=entry.ip,
        pid=entry.pid,
        hostname=entry.hostname,
        last_heartbeat_time=entry.last_heartbeat_time,
        stats=entry.stats,
    )
    backlog = None
    if entry.unacked is not None:
        oldest_s = max(0.0, now_s - entry.oldest_unacked_ms / 1000) if entry.oldest_unacked_ms else 0.0
        backlog = Backlog(entry.unacked, oldest_s)
    # The worker writes its own clock's time; a skew against Redis's clock would read as a negative age.
    return Worker(record, max(0.0, now_s - entry.last_heartbeat_time), backlog, entry.index, entry.lmcache)


async def _forget(client: redis_conn.AsyncClient, stale: list[tuple[str, str]]) -> None:
    pipe = client.pipeline(transaction=False)
    for shard, name in stale:
        pipe.hdel(shard, name)
    await pipe.execute()


async def publish(client: redis_conn.AsyncClient, workers: Sequence[tuple[str, int]]) -> None:
    """Write the fleet entries of LMCache workers (instance id, worker id), which heartbeat through a controller
    rather than an agent: call it where their heartbeat is refreshed. Two or three round trips for all of them;
    a worker whose record is gone (deregistered meanwhile) is skipped."""
    locations = [str(location) for location in FASTEST_FIRST]
    pipe = client.pipeline(transaction=False)
    for instance_id, worker_id in workers:
        pipe.hgetall(keys.worker(instance_id, worker_id))
        pipe.hgetall(keys.lmcache_sync(instance_id, worker_id))
        fleet_entry.queue_reads(pipe, instance_id, worker_id, locations)
    replies = iter(await pipe.execute(raise_on_error=False))
    found = []
    for instance_id, worker_id in workers:
        record, sync = _record(_fields(next(replies))), _sync_state(_fields(next(replies)))
        found.append((instance_id, record, sync, fleet_entry.found(replies, worker_id, locations)))
    oldest = await _first_after(client, [(instance_id, f) for instance_id, _, _, f in found])
    pipe = client.pipeline(transaction=False)
    for (instance_id, record, sync, f), first_ms in zip(found, oldest, strict=True):
        if record is not None:
            entry = _entry_of(record, sync, f, first_ms)
            pipe.hset(keys.fleet_shard(instance_id), keys.head_member(instance_id, record.worker_id), entry.encode())
    await pipe.execute()


def _fields(reply: Any) -> dict[str, str]:
    return reply if isinstance(reply, dict) else {}


async def _first_after(client: redis_conn.AsyncClient, found: list[tuple[str, fleet_entry.Found]]) -> list[int]:
    """Each worker's oldest unacked command's time, reading the few whose oldest is not yet delivered."""
    unread = [(instance_id, f.after) for instance_id, f in found if f.after is not None]
    firsts: list[Any] = []
    if unread:
        pipe = client.pipeline(transaction=False)
        for instance_id, after in unread:
            fleet_entry.queue_first_after(pipe, instance_id, after)
        firsts = await pipe.execute(raise_on_error=False)
    read = iter(firsts)
    return [fleet_entry.first_ms(next(read)) if f.after is not None else f.oldest_unacked_ms for _, f in found]


def _entry_of(record: WorkerRecord, sync: LMCacheSync | None, found: fleet_entry.Found, oldest_ms: int) -> FleetEntry:
    return FleetEntry(
        last_heartbeat_time=record.last_heartbeat_time,
        protocol=record.protocol,
        ip=record.ip,
        hostname=record.hostname,
        pid=record.pid,
        stats=record.stats,
        index=found.index,
        unacked=found.unacked,
        oldest_unacked_ms=oldest_ms,
        lmcache=sync,
    )
