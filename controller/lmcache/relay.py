"""Commands for LMCache workers: read from their instances' streams as an agent reads its own, carried
to each worker's REP socket over ZMQ, answered exactly as an agent answers.

Every controller replica that serves LMCache's protocol relays. Each reads through the worker's own
consumer group (`worker-<id>`) under its own consumer name, so a command goes to exactly one
replica whichever replica took the HTTP request, and a replica that dies loses only the commands
it held, which expire at their deadline like any unanswered command. One request is in flight per
worker at a time (its REP socket takes one), each with the command's deadline as its timeout: a
silent worker costs a 504, never a hang.

LMCache workers heartbeat only when told to (and 0.5.6 does not by default), so a worker that sent
no heartbeat lately is asked for its health instead, by one replica at a time, and an answer
counts as a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import zmq
import zmq.asyncio
from redis.crc import key_slot

from kvbus.controller import fleet
from kvbus.controller.lmcache import wire
from kvbus.shared import keys, redis_conn
from kvbus.shared.flat_fields import DecodeError, decode
from kvbus.shared.messages import Command, CommandKind, Result, ResultStatus
from kvbus.shared.outage import Outage
from kvbus.shared.records import LMCacheSync, WorkerRecord
from kvbus.shared.redis_conn import BLOCK_MS
from kvbus.shared.replies import deadline_ms, queue_reply

log = logging.getLogger("kvbus.controller.lmcache")

_READ_COUNT = 64
_MEMBERS_REFRESH_S = 1.0
_IN_FLIGHT = 32
_PROBES_IN_FLIGHT = 64
_EVICTION_WAIT_S = 0.5
_MAX_SOCKETS = 65_536
# Commands a replica took and never acked (it died) are taken over after this long: by then they
# are past their deadline, so they are answered expired, which clears them from the bus's backlog.
_RECLAIM_EVERY_S = 10.0
# How long an empty polled read waits before the next, at first and at most (see `Relay._read_once`).
_POLL_MIN_S = 0.002
_POLL_MAX_S = 0.05


@dataclass
class _Worker:
    """One LMCache worker as this replica reaches it: its socket, and the lock that keeps one request in flight."""

    instance_id: str
    worker_id: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    address: str = ""
    socket: zmq.asyncio.Socket | None = None


class Relay:
    def __init__(
        self,
        client: redis_conn.AsyncClient,
        reader: redis_conn.AsyncClient,
        *,
        consumer: str,
        heartbeat_interval_s: float,
        heartbeat_ttl_s: float,
        event_retention_s: float,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self._redis = client
        self._reader = reader  # blocking reads only: a cancelled one leaves its connection unusable
        self._consumer = consumer
        self._interval_s = heartbeat_interval_s
        self._ttl_ms = int(heartbeat_ttl_s * 1000)
        self._retention_s = max(int(event_retention_s), 1)
        self._now_ms = now_ms or (lambda: int(time.time() * 1000))
        # A socket per LMCache worker: the default of 1023 sockets a context would cap the fleet.
        self._context = zmq.asyncio.Context()
        self._context.set(zmq.MAX_SOCKETS, _MAX_SOCKETS)
        self._workers: dict[tuple[str, int], _Worker] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Commands and probes in flight at once: each holds a Redis connection while it writes, and the
        # pool refuses rather than waits past its size.
        self._slots = asyncio.Semaphore(_IN_FLIGHT)
        self._probe_slots = asyncio.Semaphore(_PROBES_IN_FLIGHT)
        self._probing = False
        self._members_cache: dict[int, list[str]] = {}
        self._members_read = 0.0
        self._poll_s = _POLL_MIN_S
        self._closing = False

    async def run(self) -> None:
        """Read and carry commands until `stop`; Redis outages are waited out."""
        outage = Outage(log, "relaying commands to LMCache workers", backoff_s=0.2, max_backoff_s=2.0)
        next_probe = next_reclaim = 0.0
        while not self._closing:
            try:
                members = await self._members()
                if time.monotonic() >= next_probe and not self._probing:
                    next_probe = time.monotonic() + self._interval_s
                    self._spawn(self._probe_pass(members))
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + _RECLAIM_EVERY_S
                    self._spawn(self._reclaim(members))
                await self._read_once(members)
            except redis_conn.ERRORS as exc:
                if self._closing:
                    return
                await asyncio.sleep(outage.failed(exc))
                with contextlib.suppress(*redis_conn.ERRORS):
                    await redis_conn.heal(self._reader)
                continue
            outage.succeeded()

    async def stop(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self._workers.values():
            if worker.socket is not None:
                worker.socket.close(linger=0)
        self._context.term()

    async def _members(self) -> dict[int, list[str]]:
        """worker id -> instances with an LMCache worker of that id: one read covers all of one id's streams.

        Read at most once a second: a worker registered since then waits that long for its first command.
        """
        if time.monotonic() - self._members_read < _MEMBERS_REFRESH_S:
            return self._members_cache
        by_worker: dict[int, list[str]] = {}
        for member in await self._redis.smembers(keys.LMCACHE_WORKERS):
            holder = keys.head_holder(str(member))
            if holder is not None:
                by_worker.setdefault(holder[1], []).append(holder[0])
        self._members_cache, self._members_read = by_worker, time.monotonic()
        return by_worker

    async def _read_once(self, members: dict[int, list[str]]) -> None:
        """One read of every worker's commands: blocking where one call covers them all, polled otherwise.

        A read names one consumer group, so one worker id; on Redis Cluster it names the streams of one
        hash slot only, and every instance has a slot of its own. Where that leaves more than one read,
        they go out non-blocking in one pipeline (one round trip per node, all nodes at once), and an
        empty round waits _POLL_MIN_S, doubling to _POLL_MAX_S while nothing comes: a command that
        arrives when the workers have been idle waits up to _POLL_MAX_S longer than a blocking read
        would have. Blocking reads side by side would hold a connection each, one per LMCache worker,
        past the pool's size in a large fleet.
        """
        if not members:
            await asyncio.sleep(_MEMBERS_REFRESH_S)
            return
        reads = _reads(self._reader, members)
        if len(reads) == 1:
            replies = [await self._blocking_read(*reads[0])]
        else:
            pipe = self._reader.pipeline(transaction=False)
            for worker_id, streams in reads:
                pipe.xreadgroup(
                    keys.command_group(worker_id), self._consumer, dict.fromkeys(streams, ">"), count=_READ_COUNT
                )
            replies = await pipe.execute(raise_on_error=False)
        received = 0
        for (worker_id, streams), reply in zip(reads, replies, strict=True):
            received += await self._take(worker_id, streams, reply)
        if len(reads) > 1:
            await self._poll_wait(received)

    async def _blocking_read(self, worker_id: int, streams: dict[str, str]) -> Any:
        try:
            # Routed by hand, as the bus's result reader is (redis_conn.routed says why).
            group = keys.command_group(worker_id)
            return await self._reader.execute_command(
                *("XREADGROUP", "GROUP", group, self._consumer, "COUNT", _READ_COUNT, "BLOCK", BLOCK_MS),
                *("STREAMS", *streams, *(">" for _ in streams)),
                **await redis_conn.routed(self._reader, next(iter(streams))),
            )
        except redis.ResponseError as exc:
            return exc

    async def _take(self, worker_id: int, streams: dict[str, str], reply: Any) -> int:
        """Carry each command a read returned; returns how many. A stream or group that vanished is repaired."""
        if isinstance(reply, redis.ResponseError) and "NOGROUP" in str(reply):
            await self._repair_groups(worker_id, list(streams.values()))
            return 0
        if isinstance(reply, Exception):
            raise reply
        taken = 0
        for stream, entries in cast(list[tuple[str, list[tuple[str, dict[str, str] | None]]]], reply or []):
            for entry_id, fields in entries:
                self._spawn(self._carry(streams[stream], worker_id, entry_id, fields))
                taken += 1
        return taken

    async def _poll_wait(self, received: int) -> None:
        if received:
            self._poll_s = _POLL_MIN_S
            return
        await asyncio.sleep(self._poll_s)
        self._poll_s = min(self._poll_s * 2, _POLL_MAX_S)

    async def _probe_pass(self, members: dict[int, list[str]]) -> None:
        self._probing = True
        try:
            await self._probe_silent(members)
        finally:
            self._probing = False

    async def _reclaim(self, members: dict[int, list[str]]) -> None:
        idle_ms = int(_RECLAIM_EVERY_S * 1000)
        for worker_id, instances in members.items():
            for instance in instances:
                with contextlib.suppress(redis.ResponseError):  # the stream or group is gone: nothing to take
                    _, entries, _ = await self._redis.xautoclaim(
                        keys.commands(instance),
                        keys.command_group(worker_id),
                        self._consumer,
                        idle_ms,
                        count=_READ_COUNT,
                    )
                    for entry_id, fields in entries:
                        self._spawn(self._carry(instance, worker_id, entry_id, fields))

    async def _repair_groups(self, worker_id: int, instances: list[str]) -> None:
        """A stream or group vanished (Redis restarted empty, or the instance left): recreate what is registered."""
        self._members_read = 0.0  # and read the membership again next round
        for instance in instances:
            if not await self._redis.exists(keys.worker(instance, worker_id)):
                await self._redis.srem(keys.LMCACHE_WORKERS, keys.head_member(instance, worker_id))
                continue
            with contextlib.suppress(redis.ResponseError):
                await self._redis.xgroup_create(
                    keys.commands(instance), keys.command_group(worker_id), id="0", mkstream=True
                )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        """A command's task that failed is logged; its entry stays pending and is taken over later."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("relaying to an LMCache worker failed: %s: %s", type(exc).__name__, exc, exc_info=exc)

    async def _carry(self, instance: str, worker_id: int, entry_id: str, fields: dict[str, str] | None) -> None:
        command = self._decode(instance, entry_id, fields)
        result = None if command is None else await self._answer(instance, worker_id, entry_id, command)
        pipe = self._redis.pipeline(transaction=False)
        if command is not None and result is not None:
            queue_reply(pipe, command, result, retention_s=self._retention_s)
        pipe.xack(keys.commands(instance), keys.command_group(worker_id), entry_id)
        async with self._slots:
            await pipe.execute()

    @staticmethod
    def _decode(instance: str, entry_id: str, fields: dict[str, str] | None) -> Command | None:
        if not fields:
            return None
        try:
            return decode(Command, fields)
        except DecodeError as exc:
            log.error("dropping undecodable command %s for %s: %s", entry_id, instance, exc)
            return None

    async def _answer(self, instance: str, worker_id: int, entry_id: str, command: Command) -> Result | None:
        async with self._slots:
            answered = await self._redis.exists(keys.done(instance, worker_id, command.event_id))
        if answered:
            return None  # answered before by a replica that died before acking
        left_ms = deadline_ms(entry_id, command) - self._now_ms()
        if left_ms <= 0:
            return _result(instance, worker_id, command, ResultStatus.EXPIRED, f"arrived {-left_ms} ms late")
        message = _message(worker_id, command)
        if isinstance(message, str):
            return _result(instance, worker_id, command, ResultStatus.REFUSED, message)
        started = time.perf_counter()
        before = await self._reported(instance, worker_id, command.location)
        answer = await self._request(instance, worker_id, message, left_ms / 1000)
        result = _result_of(instance, worker_id, command, answer)
        if command.kind == CommandKind.CLEAR and result.num_tokens > 0:
            await self._await_evictions(instance, worker_id, command.location, before, started + left_ms / 1000)
        log.info(
            "%s %s to LMCache worker %s/%d: %s %d tokens in %.1f ms",
            command.kind,
            command.event_id,
            instance,
            worker_id,
            result.status,
            result.num_tokens,
            (time.perf_counter() - started) * 1000,
        )
        return result

    async def _reported(self, instance: str, worker_id: int, location: str) -> int:
        """The number of the worker's last reported op at `location` (-1 before any)."""
        try:
            state = LMCacheSync.decode(await self._redis.hgetall(keys.lmcache_sync(instance, worker_id)))
        except DecodeError:
            return -1
        return state.seq.get(location, -1)

    async def _await_evictions(self, instance: str, worker_id: int, location: str, before: int, until: float) -> None:
        """Hold a clear's answer until the worker's report of what it evicted has reached the index.

        LMCache answers a clear first and reports the evictions with its next batch (within about
        10 ms); waiting for that keeps kvbus's rule that a clear is visible to the very next lookup,
        without dropping the chunks a clear leaves (pinned ones), which only the worker knows.
        """
        limit = min(until, time.perf_counter() + _EVICTION_WAIT_S)
        while time.perf_counter() < limit:
            if await self._reported(instance, worker_id, location) > before:
                return
            await asyncio.sleep(0.002)
        log.warning("LMCache worker %s/%d reported no evictions after a clear at %s", instance, worker_id, location)

    async def _request(
        self, instance: str, worker_id: int, message: wire.ToWorker, timeout_s: float
    ) -> wire.WorkerAnswer | str:
        """The worker's answer, or why there is none."""
        worker = self._workers.setdefault((instance, worker_id), _Worker(instance, worker_id))
        try:
            payload = wire.encode(message)
        except OverflowError:
            return "a value in the command does not fit LMCache's 64-bit integers"
        try:
            async with asyncio.timeout(timeout_s):
                async with worker.lock:
                    sock = await self._socket(worker)
                    if sock is None:
                        return "the LMCache worker is not registered"
                    # A REP socket expects the envelope a REQ socket adds: an empty frame first.
                    await sock.send_multipart([b"", payload])
                    frames = await sock.recv_multipart()
        except TimeoutError:
            self._drop_socket(worker)  # a late answer must not be read as the next request's
            return f"the LMCache worker at {worker.address} did not answer within {timeout_s:.1f} s"
        try:
            return wire.decode_answer(frames[-1])
        except wire.WireError as exc:
            return f"undecodable answer from the LMCache worker at {worker.address}: {exc}"

    async def _socket(self, worker: _Worker) -> zmq.asyncio.Socket | None:
        async with self._slots:
            fields = await self._redis.hgetall(keys.worker(worker.instance_id, worker.worker_id))
        try:
            record = WorkerRecord.decode(fields)
        except DecodeError:
            return None
        address = f"tcp://{record.ip}:{record.port}"
        if worker.socket is None or worker.address != address:
            self._drop_socket(worker)
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            worker.socket, worker.address = sock, address
        return worker.socket

    @staticmethod
    def _drop_socket(worker: _Worker) -> None:
        if worker.socket is not None:
            worker.socket.close(linger=0)
            worker.socket = None

    async def _probe_silent(self, members: dict[int, list[str]]) -> None:
        """Ask each worker that sent no heartbeat lately for its health; an answer keeps it alive.

        Two round trips for the whole fleet: the records, then the leases of the silent ones.
        """
        workers = [(instance, worker_id) for worker_id, instances in members.items() for instance in instances]
        pipe = self._redis.pipeline(transaction=False)
        for instance, worker_id in workers:
            pipe.hget(keys.worker(instance, worker_id), WorkerRecord.HEARTBEAT_FIELD)
        beats = await pipe.execute()
        now = time.time()
        silent = [w for w, beat in zip(workers, beats, strict=True) if now - float(beat or 0) >= self._interval_s]
        pipe = self._redis.pipeline(transaction=False)
        for instance, worker_id in silent:
            pipe.set(keys.lmcache_probe(instance, worker_id), self._consumer, nx=True, px=self._ttl_ms // 2)
        leases = await pipe.execute()
        # Each probe waits up to half a heartbeat_ttl; they run side by side, bounded like commands.
        await asyncio.gather(*(self._probe(*w) for w, mine in zip(silent, leases, strict=True) if mine))

    async def _probe(self, instance: str, worker_id: int) -> None:
        async with self._probe_slots:
            await self._probe_once(instance, worker_id)

    async def _probe_once(self, instance: str, worker_id: int) -> None:
        answer = await self._request(
            instance,
            worker_id,
            wire.HealthWorkerMsg(worker_event_id=f"HealthWorker{worker_id}probe"),
            self._ttl_ms / 2000,
        )
        if isinstance(answer, wire.HealthWorkerRetMsg):
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(keys.alive(instance), worker_id, px=self._ttl_ms)
            pipe.hset(keys.worker(instance, worker_id), mapping=WorkerRecord.heartbeat(time.time(), None))
            async with self._slots:
                await pipe.execute()
                # The probe stands in for the heartbeat the worker does not send: /metrics reads the entry.
                await fleet.publish(self._redis, [(instance, worker_id)])


def _reads(client: redis_conn.AsyncClient, members: dict[int, list[str]]) -> list[tuple[int, dict[str, str]]]:
    """(worker id, stream -> instance) for each read that covers `members`' command streams: one per
    worker id on a single Redis, one per worker id and hash slot on a cluster."""
    cluster = isinstance(client, redis.asyncio.cluster.RedisCluster)
    groups: dict[tuple[int, int], dict[str, str]] = {}
    for worker_id, instances in sorted(members.items()):
        for instance in sorted(instances):
            stream = keys.commands(instance)
            groups.setdefault((worker_id, key_slot(stream.encode()) if cluster else 0), {})[stream] = instance
    return [(worker_id, streams) for (worker_id, _), streams in groups.items()]


def _message(worker_id: int, command: Command) -> wire.ToWorker | str:
    """The LMCache message for a command, or why an LMCache worker cannot take it."""
    worker_event_id = f"Worker{worker_id}{command.event_id}"
    tokens = list(command.tokens)
    match command.kind:
        case CommandKind.CLEAR:
            return wire.ClearWorkerMsg(worker_event_id=worker_event_id, location=command.location)
        case CommandKind.PIN:
            return wire.PinWorkerMsg(worker_event_id=worker_event_id, location=command.location, tokens=tokens)
        case CommandKind.COMPRESS:
            return wire.CompressWorkerMsg(
                worker_event_id=worker_event_id, method=command.method, location=command.location, tokens=tokens
            )
        case CommandKind.DECOMPRESS:
            return wire.DecompressWorkerMsg(
                worker_event_id=worker_event_id, method=command.method, location=command.location, tokens=tokens
            )
        case CommandKind.HEALTH:
            return wire.HealthWorkerMsg(worker_event_id=worker_event_id)
        case CommandKind.MOVE:
            return _move(worker_event_id, worker_id, command)
        case _:
            return f"LMCache 0.5.6 workers have no {command.kind} operation"


def _move(worker_event_id: str, worker_id: int, command: Command) -> wire.MoveWorkerMsg | str:
    peer = command.peers.get(str(worker_id))
    if peer is None:
        return "LMCache workers move chunks only to another instance's peer endpoint (p2p_init_ports)"
    return wire.MoveWorkerMsg(
        worker_event_id=worker_event_id,
        old_position=command.location,
        new_position=(peer, command.dest_location),
        tokens=list(command.tokens),
        copy=command.should_copy,
    )


def _result_of(instance: str, worker_id: int, command: Command, answer: wire.WorkerAnswer | str) -> Result:
    if isinstance(answer, str):
        return _result(instance, worker_id, command, ResultStatus.ERROR, answer)
    if isinstance(answer, wire.ErrorMsg):
        return _result(instance, worker_id, command, ResultStatus.ERROR, f"the LMCache worker answered: {answer.error}")
    if isinstance(answer, wire.HealthWorkerRetMsg):
        return _result(instance, worker_id, command, ResultStatus.OK, error_code=answer.error_code)
    return _result(instance, worker_id, command, ResultStatus.OK, num_tokens=answer.num_tokens)


def _result(
    instance: str,
    worker_id: int,
    command: Command,
    status: ResultStatus,
    detail: str = "",
    *,
    num_tokens: int = 0,
    error_code: int = 0,
) -> Result:
    return Result(
        event_id=command.event_id,
        instance_id=instance,
        worker_id=worker_id,
        status=status,
        num_tokens=num_tokens,
        error_code=error_code,
        detail=detail,
    )
