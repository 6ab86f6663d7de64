"""Keeps this rank's Redis index equal to what this agent's backends hold.

Each rank (worker) of an instance has an index of its own (`keys.index(instance, worker, location)`)
and its own members in the global head sets, so a clear or eviction on one rank never hides
what another rank holds; lookup credits the instance with what every rank holds.

Backends report admissions, evictions and clears in order; each is folded at once into the net
change pending for its location (the fields to set, the fields to delete, the head hints to add
and withdraw), so reporting one costs about a dict store and Redis gets a few batched commands
per flush (one HSET of many fields, not a round trip per chunk). A command handler flushes
synchronously before it answers, so the index is current when the controller's response goes
out. A background thread flushes the rest: it sleeps until something is reported, then waits a
moment for more to coalesce (less when many are queued or a caller waits), so an idle agent costs
no CPU and a trickle of admissions still reaches Redis within a few milliseconds.

On a single Redis the commands are encoded here (`shared.resp`) and written to one pooled connection
as they are made, so Redis applies the first while the rest are encoded; a Redis Cluster, whose head
sets live in slots all over it, gets redis-py's cluster pipeline. On a single Redis the command
thread does not flush before it answers: it `take`s the pending ops encoded and sends them in the
same write as its answer, ahead of it, so Redis applies them before the answer is visible, at no
round trip of their own; it hands the replies back (`written`, `not_written`). It `hold`s the writer
while its handlers run, so what they report does not wake the background thread for ops the command
thread is about to take itself.

A clear drops the location's index hash at once. The global `head` sets are only hints
that lookup verifies against that hash, so withdrawing this rank from them (one
command per prompt) is left pending for the next flush. A clear of a location that this writer's
own writes left empty, nothing admitted since, sends nothing: an instance cleared again costs no
round trip.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.cluster

from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.own_connection import read_replies
from kvbus.shared import keys, redis_conn, resp
from kvbus.shared.locations import Location
from kvbus.shared.outage import Outage

log = logging.getLogger("kvbus.agent.index")

FIELDS_PER_COMMAND = 1000
# Redis's default hash-max-listpack-entries. Redis 7.2 and later make a hash a hashtable up front when one
# HSET brings more fields than that; 7.0 inserts them one by one into the compact listpack first, each insert
# scanning it, until the 513th converts it. Filling a 1000-chunk index from empty cost Redis 2.1 us of CPU a
# chunk that way against 0.6 us as a hashtable, so such an HSET converts the hash itself (keys.INDEX_HASHTABLE_NOW).
LISTPACK_ENTRIES = 512
# What a flush writes to Redis at a time while it encodes the rest (an HSET of FIELDS_PER_COMMAND fields is ~80 KiB).
# Each write lets go of the interpreter lock, and a thread admitting meanwhile may keep it for the 5 ms switch
# interval: writes of 64 KiB made one agent's ingest 5 % slower than one write a flush, 512 KiB 7 % faster.
SEND_BYTES = 512 * 1024
MAX_QUEUED_OPS = 1_000_000  # past this, while Redis is away, queueing gives way to a full resync
# Reported ops that make the background thread flush without waiting out its coalescing delay.
HURRY_OPS = FIELDS_PER_COMMAND


@dataclass(slots=True)
class _LocationDelta:
    """The net effect of a run of ops on one location."""

    purge: bool = False
    admit: dict[str, int] = field(default_factory=dict)
    evict: set[str] = field(default_factory=set)
    heads_added: set[str] = field(default_factory=set)
    heads_removed: set[str] = field(default_factory=set)

    def admitted(self, entry: IndexEntry) -> None:
        key = entry.key
        self.admit[key] = entry.num_tokens
        if self.evict:
            self.evict.discard(key)
        if entry.is_head:
            self.heads_removed.discard(key)
            self.heads_added.add(key)

    def evicted(self, entry: IndexEntry) -> None:
        self.admit.pop(entry.key, None)
        self.evict.add(entry.key)
        if entry.is_head:
            self.heads_added.discard(entry.key)
            self.heads_removed.add(entry.key)

    def replaced(self, entries: Iterable[IndexEntry]) -> None:
        self.purge = True
        self.dropped()
        for entry in entries:
            self.admitted(entry)

    def dropped(self) -> None:
        """Forget every admission and eviction folded in so far."""
        # Hints an earlier clear left to withdraw still must go.
        self.admit, self.evict, self.heads_added = {}, set(), set()

    def forget(self, heads: Iterable[str]) -> None:
        """Withdraw `heads`' hints, as if before every op folded in so far."""
        self.heads_removed.update(h for h in heads if h not in self.heads_added)

    def then(self, later: _LocationDelta) -> _LocationDelta:
        """This delta followed by `later`: for ops taken by a flush that failed, put back before those since."""
        if later.purge:
            later.forget(self.heads_removed)
            return later
        self.admit = {k: n for k, n in self.admit.items() if k not in later.evict}
        self.admit.update(later.admit)
        self.evict = (self.evict - later.admit.keys()) | later.evict
        self.heads_added = (self.heads_added - later.heads_removed) | later.heads_added
        self.heads_removed = (self.heads_removed - later.heads_added) | later.heads_removed
        return self


@dataclass(slots=True)
class Taken:
    """Pending ops taken by a caller that writes them itself, ahead of its own commands, on its own connection."""

    commands: bytes  # encoded, to be sent before anything that must follow them
    replies: int  # how many replies they get, read before the caller's own
    deltas: dict[Location, _LocationDelta]
    upto: int  # the count of ops reported when they were taken
    count: int  # how many ops were taken
    purged: list[tuple[Location, int]]  # purged locations, each with where the reply to its SMEMBERS is


class IndexWriter:
    """The IndexListener of every backend of one agent (one rank of an instance)."""

    def __init__(
        self, client: redis_conn.Client, instance_id: str, worker_id: int, *, coalesce_s: float = 0.001
    ) -> None:
        self._redis = client
        self._instance = instance_id
        self._worker = worker_id
        self._member = keys.head_member(instance_id, worker_id)  # this rank in the global head sets
        self._coalesce_s = coalesce_s
        self._deltas: dict[Location, _LocationDelta] = {}
        self._ops_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()  # something is pending
        self._hurry = threading.Event()  # and should not wait out the coalescing delay
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._overflowed = False
        self._resync_needed: list[Location] = []
        # Locations whose index and heads keys this writer's last writes left empty, with nothing admitted
        # since: a clear of one needs no purge. Only a clear: a republish (replaced()) after a failover or a
        # Redis restart purges whatever Redis holds, whatever this writer believes.
        self._clean: set[Location] = set()
        # Ops are numbered as reported; a flush that succeeds has written every op numbered up to the
        # count it took its ops at. `written_within` waits on these.
        self._queued_count = 0
        self._taken_count = 0  # ops up to this one were taken by a flush; those after are pending
        self._written_count = 0
        self._written = threading.Condition()
        self._late_since = 0  # the target of the last wait that ran out; no waiting until it is written
        # The thread (its ident) that will take what is pending itself soon: what it reports until then does not
        # wake the background thread. What other threads report does, so an engine's admissions never wait on it.
        self._held_by: int | None = None

    # IndexListener: called by backends under their lock, so ops land in the order they happened. One per chunk
    # an engine computes, so admitted() is the delta's fold written out in line: a call less is a tenth less.
    def admitted(self, location: Location, entry: IndexEntry) -> None:
        key, num_tokens, is_head = entry
        with self._ops_lock:
            delta = self._deltas.get(location)
            if delta is None:
                delta = self._deltas[location] = _LocationDelta()
            delta.admit[key] = num_tokens
            if delta.evict:
                delta.evict.discard(key)
            if is_head:
                delta.heads_removed.discard(key)
                delta.heads_added.add(key)
            self._queued_count = queued = self._queued_count + 1
            pending = queued - self._taken_count
            if pending > MAX_QUEUED_OPS:
                self._overflow()
        if pending == 1 or pending == HURRY_OPS or self._held_by is not None:
            self._nudge(pending)

    def evicted(self, location: Location, entry: IndexEntry) -> None:
        with self._ops_lock:
            delta = self._deltas.get(location)
            if delta is None:
                delta = self._deltas[location] = _LocationDelta()
            delta.evicted(entry)
            pending = self._counted()
        self._nudge(pending)

    def cleared(self, location: Location) -> None:
        with self._ops_lock:
            delta = self._deltas.get(location)
            if location in self._clean:
                if delta is None:
                    return  # Redis holds nothing of it and nothing is pending: nothing to do, nothing to count
                delta.dropped()  # Redis holds nothing of it: what is pending is all there is to clear
            else:
                if delta is None:
                    delta = self._deltas[location] = _LocationDelta()
                delta.replaced(())
            pending = self._counted()
        self._nudge(pending)

    def replaced(self, location: Location, entries: list[IndexEntry]) -> None:
        with self._ops_lock:
            self._deltas.setdefault(location, _LocationDelta()).replaced(entries)
            pending = self._counted()
        self._nudge(pending)

    def _counted(self) -> int:
        """Count one more op (under the ops lock); the number pending. admitted() does the same in line."""
        self._queued_count += 1
        pending = self._queued_count - self._taken_count
        if pending > MAX_QUEUED_OPS:
            self._overflow()
        return pending

    def _nudge(self, pending: int) -> None:
        held_by = self._held_by
        if held_by is not None:
            # What the holder reports it takes itself; another thread's op, or too many to wait, is flushed.
            if held_by != threading.get_ident() or pending >= HURRY_OPS:
                self._wake.set()
        elif pending == 1:
            self._wake.set()
        elif pending == HURRY_OPS:
            self._hurry.set()

    def _overflow(self) -> None:
        self._resync_needed.extend(self._deltas)
        self._deltas = {}
        self._taken_count = self._queued_count
        if not self._overflowed:
            log.warning(
                "index writes queued past %d while Redis is unreachable; "
                "the index will be rebuilt from the backends once it returns",
                MAX_QUEUED_OPS,
            )
        self._overflowed = True

    def take_resync_request(self) -> list[Location]:
        """Locations whose queued ops were dropped; the owner republishes them from its backends."""
        if not self._resync_needed and not self._overflowed:
            return []  # without the lock: the heartbeat asks every second, and a request missed now waits a beat
        with self._ops_lock:
            locations, self._resync_needed = self._resync_needed, []
            self._overflowed = False
            return locations

    def flush(self) -> None:
        """Write every pending op to Redis now. Raises redis.RedisError; the ops then stay pending."""
        with self._send_lock:
            deltas, upto, taken = self._take_deltas()
            if deltas:
                try:
                    self._write(deltas)
                except redis_conn.ERRORS:
                    self._put_back(deltas, taken)
                    raise
            self._done(deltas, upto)

    def hold(self) -> None:
        """The calling thread will `take` what is pending soon: until then, what it reports does not wake the
        background thread (past HURRY_OPS it does)."""
        self._held_by = threading.get_ident()

    def release(self) -> None:
        """The holder will not `take` after all: the background thread writes what is pending."""
        self._held_by = None
        self._wake.set()

    def take(self) -> Taken | None:
        """Take every pending op, encoded for a single Redis, for the caller to send ahead of its own commands;
        None when there is nothing to send. Until the caller hands the replies back (`written`) or gives up
        (`not_written`), no other flush is sent, so nothing reported since can reach Redis before these."""
        if self._written_count >= self._queued_count:
            # Every op reported is in Redis, none pending or in flight: nothing to send ahead, no lock to take.
            # (An op another thread reports meanwhile wakes the background thread, as when the hold ends.)
            self._held_by = None
            return None
        self._send_lock.acquire()
        try:
            deltas, upto, count = self._take_deltas()
            commands, replies, purged = self._encode_raw(deltas)
        except BaseException:
            self._send_lock.release()
            raise
        if not commands:
            self._done(deltas, upto)
            self._send_lock.release()
            return None
        return Taken(commands, replies, deltas, upto, count, purged)

    def written(self, taken: Taken, answers: list[Any]) -> None:
        """`taken` was sent and these are its replies (an error reply as a redis.ResponseError in its place)."""
        try:
            self._absorb_purges(taken.deltas, taken.purged, answers)
            error = _first_error(answers)
            if error is not None:
                # Its answer is out already: the ops go back for the thread's next flush, as a failed flush's do.
                log.warning("index writes sent with a command's answer failed (%s); retrying them", error)
                self._put_back(taken.deltas, taken.count)
                return
            self._done(taken.deltas, taken.upto)
        finally:
            self._send_lock.release()

    def not_written(self, taken: Taken) -> None:
        """`taken` may not have reached Redis: its ops stay pending, as a failed flush's do."""
        try:
            self._put_back(taken.deltas, taken.count)
        finally:
            self._send_lock.release()

    def _take_deltas(self) -> tuple[dict[Location, _LocationDelta], int, int]:
        """Take every pending op (under the send lock): the deltas, the op count they go up to, how many."""
        with self._ops_lock:
            self._held_by = None
            deltas, self._deltas = self._deltas, {}
            upto, taken = self._queued_count, self._queued_count - self._taken_count
            self._taken_count = upto
            self._clean.difference_update(location for location, delta in deltas.items() if delta.admit)
        return deltas, upto, taken

    def _done(self, deltas: dict[Location, _LocationDelta], upto: int) -> None:
        """`deltas`, the ops up to `upto`, are in Redis."""
        if deltas:
            with self._ops_lock:
                self._clean.update(location for location, delta in deltas.items() if delta.purge and not delta.admit)
        with self._written:
            self._written_count = max(self._written_count, upto)
            self._written.notify_all()

    def _put_back(self, deltas: dict[Location, _LocationDelta], taken: int) -> None:
        with self._ops_lock:
            for location, later in self._deltas.items():
                deltas[location] = deltas[location].then(later) if location in deltas else later
            self._deltas = deltas
            self._taken_count -= taken
        self._wake.set()  # whoever flushes next retries them, though nothing new is reported

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
            self._hurry.set()
            self._wake.set()
            if self._written.wait_for(lambda: self._written_count >= target, timeout_s):
                return True
            self._late_since = target
            return False

    def drain(self) -> None:
        """Flush until nothing is pending, the head hints a clear leaves for later included."""
        while self._deltas:
            self.flush()

    def purge(self, locations: list[Location]) -> None:
        """Drop everything the index says this rank holds at `locations`, e.g. left by a crashed run."""
        for location in locations:
            self.replaced(location, [])
        self.drain()

    def _write(self, deltas: dict[Location, _LocationDelta]) -> None:
        if isinstance(self._redis, redis.Redis):
            self._write_raw(deltas, self._redis)
        else:
            self._write_pipelined(deltas)

    def _forget_later(self, location: Location, old: Iterable[str], readmitted: set[str]) -> None:
        """Leave the withdrawal of a purged location's head hints to the next flush, ahead of every op since."""
        heads = set(old) - readmitted
        if not heads:
            return
        with self._ops_lock:
            self._deltas.setdefault(location, _LocationDelta()).forget(heads)
        self._wake.set()

    def _write_raw(self, deltas: dict[Location, _LocationDelta], client: redis.Redis) -> None:
        purged: list[tuple[Location, int]] = []
        answers = _exchange(client, self._commands(deltas, purged))
        self._absorb_purges(deltas, purged, answers)
        _raise_any(answers)

    def _encode_raw(self, deltas: dict[Location, _LocationDelta]) -> tuple[bytes, int, list[tuple[Location, int]]]:
        """The commands that apply `deltas`, encoded; how many replies they get; each purged location with where
        the reply to its SMEMBERS is."""
        purged: list[tuple[Location, int]] = []
        commands = list(self._commands(deltas, purged))
        return b"".join(encoded for encoded, _ in commands), sum(count for _, count in commands), purged

    def _commands(
        self, deltas: dict[Location, _LocationDelta], purged: list[tuple[Location, int]]
    ) -> Iterator[tuple[bytes, int]]:
        """The commands that apply `deltas`, each encoded with its number of replies, made as they are consumed;
        each purged location goes into `purged` with where the reply to its SMEMBERS is."""
        replies = 0
        for location, delta in deltas.items():
            index_key = keys.index(self._instance, self._worker, location)
            heads_key = keys.heads(self._instance, self._worker, location)
            if delta.purge:
                purged.append((location, replies))
                yield resp.command("SMEMBERS", heads_key), 1
                yield resp.command("UNLINK", index_key, heads_key), 1
                replies += 2
            for encoded, count in self._encoded(location, index_key, heads_key, delta):
                yield encoded, count
                replies += count

    def _absorb_purges(
        self, deltas: dict[Location, _LocationDelta], purged: list[tuple[Location, int]], answers: list[Any]
    ) -> None:
        for location, at in purged:
            # Even when a later reply is an error: the purge is done, and its hints are known only from here.
            if not isinstance(answers[at], redis.ResponseError):
                self._forget_later(location, answers[at], deltas[location].heads_added)

    def _encoded(
        self, location: Location, index_key: str, heads_key: str, delta: _LocationDelta
    ) -> Iterable[tuple[bytes, int]]:
        """The commands that apply `delta`, encoded, each with the number of replies it gets."""
        yield from _fields(index_key, delta)
        if delta.heads_added:
            yield resp.command("SADD", heads_key, *delta.heads_added), 1
        if delta.heads_removed:
            yield resp.command("SREM", heads_key, *delta.heads_removed), 1
        for name, heads in (("SADD", delta.heads_added), ("SREM", delta.heads_removed)):
            if heads:
                yield resp.each(name, [keys.head(location, head) for head in heads], self._member), len(heads)

    def _write_pipelined(self, deltas: dict[Location, _LocationDelta]) -> None:
        purged = [location for location, delta in deltas.items() if delta.purge]
        if purged:
            pipe = self._redis.pipeline(transaction=False)
            for location in purged:
                heads_key = keys.heads(self._instance, self._worker, location)
                pipe.smembers(heads_key)
                # One key an UNLINK: a cluster pipeline takes no multi-key UNLINK, even within one slot.
                pipe.unlink(keys.index(self._instance, self._worker, location))
                pipe.unlink(heads_key)
            answers = pipe.execute()
            for location, old in zip(purged, answers[::3], strict=True):
                self._forget_later(location, old, deltas[location].heads_added)
        fields_sent = self._send_fields_to_node(deltas)
        pipe = self._redis.pipeline(transaction=False)
        for location, delta in deltas.items():
            self._add_commands(pipe, location, delta, with_fields=not fields_sent)
        pipe.execute()

    def _send_fields_to_node(self, deltas: dict[Location, _LocationDelta]) -> bool:
        """On a cluster, write the index fields (most of a flush's bytes), encoded here, straight to the node
        serving this instance's slot, where every index key of the instance lives. False when that failed
        (the slot moved or is moving, the node went away): the cluster pipeline then sends them, following
        redirections and refreshing its slot map as it does. Index fields are safe to write twice."""
        assert isinstance(self._redis, redis.cluster.RedisCluster)
        fields = [
            (encoded, count)
            for location, delta in deltas.items()
            for encoded, count in _fields(keys.index(self._instance, self._worker, location), delta)
        ]
        if not fields:
            return True
        try:
            # Every index key of this instance, whatever its rank or location, is in the slot of its hash tag.
            node = self._redis.get_node_from_key(keys.index(self._instance, self._worker, next(iter(deltas))))
            _raise_any(_exchange(self._redis.get_redis_connection(node), fields))
        except redis_conn.ERRORS as exc:
            log.debug("index fields go by the cluster pipeline this time: %s", exc)
            return False
        return True

    def _add_commands(
        self, pipe: redis_conn.Pipeline, location: Location, delta: _LocationDelta, *, with_fields: bool
    ) -> None:
        index_key = keys.index(self._instance, self._worker, location)
        heads_key = keys.heads(self._instance, self._worker, location)
        if with_fields:
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
        self._hurry.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        outage = Outage(log, "index writes to Redis", backoff_s=0.2, max_backoff_s=2.0)
        while True:
            self._wake.wait()  # no timeout: an idle agent's thread costs nothing
            self._hurry.wait(self._coalesce_s)
            if self._stop.is_set():
                return
            self._wake.clear()
            self._hurry.clear()
            try:
                self.flush()
            except redis_conn.ERRORS as exc:
                self._stop.wait(outage.failed(exc))
                continue
            outage.succeeded()


def _fields(index_key: str, delta: _LocationDelta) -> Iterable[tuple[bytes, int]]:
    """The HSETs and HDELs that apply `delta` to the index hash, encoded, each with its number of replies."""
    names, values = list(delta.admit), list(delta.admit.values())
    for start in range(0, len(names), FIELDS_PER_COMMAND):
        end = start + FIELDS_PER_COMMAND
        fields = resp.hset(index_key, names[start:end], values[start:end])
        if start or min(end, len(names)) <= LISTPACK_ENTRIES:  # after the first such HSET, a hashtable
            yield fields, 1
            continue
        # In a transaction, so that no reader ever sees the extra field: MULTI, three QUEUED, EXEC.
        yield (
            b"".join(
                [
                    resp.command("MULTI"),
                    resp.command("HSET", index_key, keys.INDEX_HASHTABLE_NOW, 0),
                    fields,
                    resp.command("HDEL", index_key, keys.INDEX_HASHTABLE_NOW),
                    resp.command("EXEC"),
                ]
            ),
            5,
        )
    evicted = list(delta.evict)
    for start in range(0, len(evicted), FIELDS_PER_COMMAND):
        yield resp.command("HDEL", index_key, *evicted[start : start + FIELDS_PER_COMMAND]), 1


def _exchange(client: redis.Redis, commands: Iterable[tuple[bytes, int]]) -> list[Any]:
    """Send `commands` (each encoded, with its number of replies) on one pooled connection and read their replies,
    a reply that is an error in its place as a redis.ResponseError.

    They go out as they are made, SEND_BYTES at a time, so that Redis applies the first while the rest are
    encoded: sent in one write after all were encoded, a flush of 80k chunks kept Redis idle for the 10-30 ms
    the encoding took. Retried as redis-py retries a pipeline: every command the index writer sends is safe to
    repeat, and a retry sends again what the failed try sent before the rest."""
    pending = iter(commands)
    first = next(pending, None)
    if first is None:
        return []
    pending = itertools.chain((first,), pending)
    pool = client.connection_pool
    connection = pool.get_connection()
    sent: list[bytes] = []
    replies = 0

    def send() -> list[Any]:
        nonlocal replies
        for data in sent:
            connection.send_packed_command([data])
        batch: list[bytes] = []
        size = 0
        for encoded, count in pending:
            batch.append(encoded)
            size += len(encoded)
            replies += count
            if size >= SEND_BYTES:
                sent.append(b"".join(batch))
                batch, size = [], 0
                connection.send_packed_command([sent[-1]])
        if batch:
            sent.append(b"".join(batch))
            connection.send_packed_command([sent[-1]])
        return read_replies(connection, replies)

    try:
        return connection.retry.call_with_retry(send, lambda _: connection.disconnect())
    finally:
        pool.release(connection)


def _raise_any(answers: list[Any]) -> None:
    """Raise the first of `answers` that is an error, as a pipeline does."""
    error = _first_error(answers)
    if error is not None:
        raise error


def _first_error(answers: list[Any]) -> redis.ResponseError | None:
    """The first error among `answers`, an error within a transaction's reply (EXEC's list) included."""
    for answer in answers:
        if isinstance(answer, redis.ResponseError):
            return answer
        if isinstance(answer, list):
            inner = next((reply for reply in answer if isinstance(reply, redis.ResponseError)), None)
            if inner is not None:
                return inner
    return None
