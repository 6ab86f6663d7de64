"""Keeps this rank's Redis index equal to what this agent's backends hold.

Each rank (worker) of an instance has an index of its own (`keys.index(instance, worker, location)`)
and its own members in the global head sets, so a clear or eviction on one rank never hides
what another rank holds; lookup credits the instance with what every rank holds.

Backends report admissions, evictions and clears in order into one op log; `flush()`
folds the log into a few batched commands (one HSET of many fields per location, not a
round trip per chunk). A background thread flushes every few milliseconds; a command
handler flushes synchronously before it answers, so the index is current when the
controller's response goes out.

A clear drops the location's index hash at once. The global `head` sets are only hints
that lookup verifies against that hash, so withdrawing this rank from them (one
command per prompt) is queued as a `forget` op and done by the next flush.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from kvbus.agent.backends.base import IndexEntry
from kvbus.shared import keys, redis_conn
from kvbus.shared.locations import Location
from kvbus.shared.outage import Outage

log = logging.getLogger("kvbus.agent.index")

FIELDS_PER_COMMAND = 1000
MAX_QUEUED_OPS = 1_000_000  # past this, while Redis is away, queueing gives way to a full resync


class _Op(NamedTuple):
    """One change, queued per chunk admitted or evicted: kept as light as a tuple."""

    kind: str  # "admit" | "evict" | "replace" | "forget"
    location: Location
    entry: IndexEntry | None = None
    entries: tuple[IndexEntry, ...] = ()
    heads: frozenset[str] = frozenset()  # for "forget": head hints to withdraw


@dataclass
class _LocationDelta:
    """The net effect of a run of ops on one location."""

    purge: bool = False
    admit: dict[str, int] = field(default_factory=dict)
    evict: set[str] = field(default_factory=set)
    heads_added: set[str] = field(default_factory=set)
    heads_removed: set[str] = field(default_factory=set)

    def apply(self, op: _Op) -> None:
        if op.kind == "replace":
            # Everything before is superseded, but hints an earlier clear left to withdraw still must go.
            self.purge = True
            self.admit, self.evict, self.heads_added = {}, set(), set()
            for entry in op.entries:
                self._admit(entry)
            return
        if op.kind == "forget":
            self.heads_removed |= op.heads - self.heads_added
            return
        assert op.entry is not None
        if op.kind == "admit":
            self._admit(op.entry)
        else:
            self.admit.pop(op.entry.key, None)
            self.evict.add(op.entry.key)
            if op.entry.is_head:
                self.heads_added.discard(op.entry.key)
                self.heads_removed.add(op.entry.key)

    def _admit(self, entry: IndexEntry) -> None:
        self.evict.discard(entry.key)
        self.admit[entry.key] = entry.num_tokens
        if entry.is_head:
            self.heads_removed.discard(entry.key)
            self.heads_added.add(entry.key)


class IndexWriter:
    """The IndexListener of every backend of one agent (one rank of an instance)."""

    def __init__(
        self, client: redis_conn.Client, instance_id: str, worker_id: int, *, flush_interval_s: float = 0.005
    ) -> None:
        self._redis = client
        self._instance = instance_id
        self._worker = worker_id
        self._member = keys.head_member(instance_id, worker_id)  # this rank in the global head sets
        self._interval = flush_interval_s
        self._ops: deque[_Op] = deque()
        self._ops_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._overflowed = False
        self._resync_needed: list[Location] = []
        # Ops are numbered as queued; a flush that succeeds has written every op numbered up to the
        # count it took its ops at. `written_within` waits on these.
        self._queued_count = 0
        self._written_count = 0
        self._written = threading.Condition()
        self._late_since = 0  # the target of the last wait that ran out; no waiting until it is written

    # IndexListener: called by backends under their lock, so ops land in the order they happened.
    def admitted(self, location: Location, entry: IndexEntry) -> None:
        self._enqueue(_Op("admit", location, entry))

    def evicted(self, location: Location, entry: IndexEntry) -> None:
        self._enqueue(_Op("evict", location, entry))

    def cleared(self, location: Location) -> None:
        self._enqueue(_Op("replace", location))

    def replaced(self, location: Location, entries: list[IndexEntry]) -> None:
        self._enqueue(_Op("replace", location, entries=tuple(entries)))

    def _enqueue(self, op: _Op) -> None:
        with self._ops_lock:
            if op.kind == "replace":
                # Whatever is queued for this location is superseded, but for hints left to withdraw.
                self._ops = deque(o for o in self._ops if o.location != op.location or o.kind == "forget")
            self._ops.append(op)
            self._queued_count += 1
            queued = len(self._ops)
            if queued > MAX_QUEUED_OPS:
                self._overflow()
        if queued == FIELDS_PER_COMMAND:
            self._wake.set()

    def _overflow(self) -> None:
        locations = {o.location for o in self._ops}
        self._ops.clear()
        self._resync_needed.extend(locations)
        if not self._overflowed:
            log.warning(
                "index writes queued past %d while Redis is unreachable; "
                "the index will be rebuilt from the backends once it returns",
                MAX_QUEUED_OPS,
            )
        self._overflowed = True

    def take_resync_request(self) -> list[Location]:
        """Locations whose queued ops were dropped; the owner republishes them from its backends."""
        with self._ops_lock:
            locations, self._resync_needed = self._resync_needed, []
            self._overflowed = False
            return locations

    def flush(self) -> None:
        """Write every queued op to Redis now. Raises redis.RedisError; the ops then stay queued."""
        with self._send_lock:
            with self._ops_lock:
                ops, self._ops = list(self._ops), deque()
                upto = self._queued_count
            if ops:
                try:
                    self._write(ops)
                except redis_conn.ERRORS:
                    with self._ops_lock:
                        self._ops.extendleft(reversed(ops))
                    raise
            with self._written:
                self._written_count = max(self._written_count, upto)
                self._written.notify_all()

    def written_within(self, timeout_s: float) -> bool:
        """Have the background thread write every op queued so far now, and wait for it up to `timeout_s`.

        For a caller on a request path (vLLM's forward), which wants the index current but must not
        wait on a stalled Redis: False when the wait runs out, the ops staying queued. After that,
        calls answer False at once until the thread has caught up, so a stall costs one wait, not
        one per request.
        """
        with self._ops_lock:
            target = self._queued_count
        with self._written:
            if self._written_count < self._late_since:
                return False
            self._wake.set()
            if self._written.wait_for(lambda: self._written_count >= target, timeout_s):
                return True
            self._late_since = target
            return False

    def drain(self) -> None:
        """Flush until nothing is queued, the head hints a clear leaves for later included."""
        while self._ops:
            self.flush()

    def purge(self, locations: list[Location]) -> None:
        """Drop everything the index says this rank holds at `locations`, e.g. left by a crashed run."""
        for location in locations:
            self.replaced(location, [])
        self.drain()

    def _write(self, ops: list[_Op]) -> None:
        deltas: dict[Location, _LocationDelta] = {}
        for op in ops:
            delta = deltas.get(op.location)
            if delta is None:
                delta = deltas[op.location] = _LocationDelta()
            delta.apply(op)
        purged = [loc for loc, delta in deltas.items() if delta.purge]
        if purged:
            self._purge(purged, deltas)
        pipe = self._redis.pipeline(transaction=False)
        for location, delta in deltas.items():
            self._add_commands(pipe, location, delta)
        pipe.execute()

    def _purge(self, locations: list[Location], deltas: dict[Location, _LocationDelta]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for location in locations:
            heads_key = keys.heads(self._instance, self._worker, location)
            pipe.smembers(heads_key)
            # One key an UNLINK: a cluster pipeline takes no multi-key UNLINK, even within one slot.
            pipe.unlink(keys.index(self._instance, self._worker, location))
            pipe.unlink(heads_key)
        replies = pipe.execute()
        forget = [
            _Op("forget", location, heads=frozenset(old) - deltas[location].heads_added)
            for location, old in zip(locations, replies[::3], strict=True)
            if old
        ]
        # Ahead of every op queued since: they happened after this clear.
        with self._ops_lock:
            self._ops.extendleft(reversed(forget))
        if forget:
            self._wake.set()

    def _add_commands(self, pipe: redis_conn.Pipeline, location: Location, delta: _LocationDelta) -> None:
        index_key = keys.index(self._instance, self._worker, location)
        heads_key = keys.heads(self._instance, self._worker, location)
        items = list(delta.admit.items())
        for start in range(0, len(items), FIELDS_PER_COMMAND):
            pipe.hset(index_key, mapping=dict(items[start : start + FIELDS_PER_COMMAND]))
        evicted = list(delta.evict)
        for start in range(0, len(evicted), FIELDS_PER_COMMAND):
            pipe.hdel(index_key, *evicted[start : start + FIELDS_PER_COMMAND])
        if delta.heads_added:
            pipe.sadd(heads_key, *delta.heads_added)
        if delta.heads_removed:
            pipe.srem(heads_key, *delta.heads_removed)
        for head in delta.heads_added:
            pipe.sadd(keys.head(location, head), self._member)
        for head in delta.heads_removed:
            pipe.srem(keys.head(location, head), self._member)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"kvbus-index-{self._instance}-{self._worker}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        outage = Outage(log, "index writes to Redis", backoff_s=0.2, max_backoff_s=2.0)
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self.flush()
            except redis_conn.ERRORS as exc:
                self._stop.wait(outage.failed(exc))
                continue
            outage.succeeded()
