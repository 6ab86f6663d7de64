"""The controller's side of the command bus: XADD a command, await its result.

Each controller process owns one result stream, read by one task that resolves the
futures of waiting requests, so any number of controller processes run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import redis
import redis.asyncio

from kvbus.controller.errors import REDIS_DOWN, AgentTimeout, UnknownInstance, redis_stalled
from kvbus.shared import keys, redis_conn
from kvbus.shared.flat_fields import DecodeError, encode
from kvbus.shared.messages import Command, CommandKind, Result, ResultStatus
from kvbus.shared.outage import Outage
from kvbus.shared.pipelined import Pipelined
from kvbus.shared.records import (
    CommandRecord,
    JournaledCommand,
    RecordedResult,
    ResultsOpened,
    Working,
    decode_result,
)
from kvbus.shared.redis_conn import BLOCK_MS
from kvbus.shared.resp import Entry, pack, stream_entries

log = logging.getLogger("kvbus.controller.bus")

COMMAND_RETENTION_MS = 10 * 60 * 1000  # older commands have no waiter left; trimmed on XADD
RESULTS_TTL_S = 60  # the result stream of a vanished controller expires after this
# How long a 504 may wait to say whether the silent instance still heartbeats: a healthy Redis answers
# in well under a millisecond, and a stalled one must not hold the answer.
SILENCE_S = 0.25
# A command whose workers keep saying they are at it (records.Working) is waited for up to this many
# command_timeouts: a bound on a worker stuck in a loop that still signs.
LONGEST_COMMAND_TIMEOUTS = 12
_TTL_REFRESH_S = 10
_FAILED: tuple[type[Exception], ...] = (*redis_conn.ERRORS, TimeoutError)  # a call that did not go through in time


# The send and the record: on Redis Cluster two steps, each atomic in one slot (the instance's: its
# workers, heartbeat and command stream share its hash tag; and its record's: a shard of records with its
# list of ids); on one Redis, one script that does both and journals the command, a round trip less.
#
# The send: find the instance's workers and send the command; answers 'sent' or 'down', the entry's
# time, then the workers. No workers or no stream means the instance is unknown: nothing is written. No
# heartbeat (the alive key expired) means no worker reads the stream: the command is not sent, since it
# would run whenever the instance came back, long after anyone waited for it.
_SEND_FUNCTION = """
local function send(workers_key, stream_key, alive_key, minid, first_field)
  local workers = redis.call('SMEMBERS', workers_key)
  if #workers == 0 or redis.call('EXISTS', stream_key) == 0 then return false end
  if redis.call('EXISTS', alive_key) == 0 then
    local now = redis.call('TIME')  -- what the entry id would have been: the deadline counts from it
    return {'down', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000), unpack(workers)}
  end
  local entry = redis.call('XADD', stream_key, 'MINID', '~', minid, '*', unpack(ARGV, first_field))
  return {'sent', tonumber(string.match(entry, '^%d+')), unpack(workers)}
end
"""

# The record, for /check_finish: written while the workers run the command (their results go into the
# same hash, other fields), each unsent command's workers marked `expired` (`not_sent`). Records are kept
# for event_retention (their TTL) and at most `keep` of them per shard: the shard's list of ids drops the
# oldest past it (at most TRIM_STEP a send, which bounds the script's work when the count is lowered)
# and, a few a send, the ids of records that expired, so it holds about the live records only.
# `s`: the settings (JSON, below, in `_settings`); `sent`: the send's answer.
_RECORD_FUNCTION = """
local function record(record_key, ids_key, s, sent)
  local state, at_ms, workers = sent[1], sent[2], {unpack(sent, 3)}
  if state ~= 'sent' then
    for _, worker in ipairs(workers) do
      redis.call('HSET', record_key, worker, s.not_sent)  -- CommandRecord.result_field
    end
  end
  redis.call('HSET', record_key, s.deadline_field, at_ms + s.timeout_ms,
             s.workers_field, '[' .. table.concat(workers, ',') .. ']', unpack(s.record))
  redis.call('PEXPIRE', record_key, s.retention_ms)
  local kept = redis.call('RPUSH', ids_key, s.event_id)
  if kept > s.keep then
    local oldest = redis.call('LPOP', ids_key, math.min(kept - s.keep, s.trim_step))
    for i = 1, #oldest do oldest[i] = s.record_prefix .. oldest[i] end
    redis.call('UNLINK', unpack(oldest))
  end
  for _ = 1, 2 do
    local head = redis.call('LINDEX', ids_key, 0)
    if redis.call('EXISTS', s.record_prefix .. head) == 1 then break end
    redis.call('LPOP', ids_key)
  end
end
"""

# KEYS: the workers set, the command stream, the alive key. ARGV[1]: the MINID the stream is trimmed
# to; ARGV[2...]: the command's fields.
_SEND = _SEND_FUNCTION + "return send(KEYS[1], KEYS[2], KEYS[3], ARGV[1], 2)"

# KEYS: the record, the shard's list of ids. ARGV[1]: the settings; ARGV[2]: the send's answer (JSON).
_RECORD = _RECORD_FUNCTION + "record(KEYS[1], KEYS[2], cjson.decode(ARGV[1]), cjson.decode(ARGV[2])) return 1"

# One Redis: KEYS: the send's, the record's, then the journal. ARGV[1]: the settings; ARGV[2]: the MINID;
# ARGV[3...]: the command's fields.
_SEND_AND_RECORD = (
    _SEND_FUNCTION
    + _RECORD_FUNCTION
    + """
local sent = send(KEYS[1], KEYS[2], KEYS[3], ARGV[2], 3)
if not sent then return false end
local s = cjson.decode(ARGV[1])
record(KEYS[4], KEYS[5], s, sent)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', s.journal_maxlen, '*', unpack(s.journal))
return sent
"""
)
TRIM_STEP = 100
NOT_SENT = "not sent: the instance had no heartbeat"  # the recorded detail of each worker of an unsent command


def _flat(fields: Mapping[Any, Any]) -> list[str]:
    return [str(v) for kv in fields.items() for v in kv]


@dataclass(frozen=True)
class _Sent:
    delivered: bool  # False: the instance had no heartbeat, and the command was not sent
    at_ms: int  # Redis server time of the send, which the command's deadline counts from
    workers: list[int]


def _not_sent(instance_id: str, sent: _Sent, event_id: str) -> AgentTimeout:
    return AgentTimeout(
        f"the command was not sent: {instance_id!r} (workers {', '.join(map(str, sent.workers))}) has no heartbeat, "
        "so its engine is down or cannot reach Redis; it is not queued to run when the instance returns",
        event_id=event_id,
    )


@dataclass
class Outcome:
    """Every worker's result for one command, by worker id."""

    event_id: str
    instance_id: str
    results: dict[int, Result]


class _Waiter:
    def __init__(self) -> None:
        self.expected: set[int] | None = None
        self.results: dict[int, Result] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.working_at = 0.0  # the loop time of the newest sign that a worker is still at it

    def add(self, result: Result) -> None:
        self.results[result.worker_id] = result
        self._check()

    def working(self) -> None:
        self.working_at = asyncio.get_running_loop().time()

    def expect(self, workers: set[int]) -> None:
        self.expected = workers
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.expected <= self.results.keys() and not self.done.done():
            self.done.set_result(None)


class CommandBus:
    def __init__(
        self,
        client: redis_conn.AsyncClient,
        reader: redis_conn.AsyncClient,
        *,
        timeout_s: float,
        redis_timeout_s: float = 1.0,
        event_retention_s: float = 3600.0,
        event_retention_count: int = 100_000,
    ) -> None:
        self._redis = client
        self._reader = reader
        self.timeout_s = timeout_s
        self.redis_timeout_s = redis_timeout_s
        self.event_retention_ms = int(event_retention_s * 1000)
        self.event_retention_count = event_retention_count
        self.controller_id = uuid.uuid4().hex[:12]
        self.results_key = keys.results(self.controller_id)
        self._one_redis = not isinstance(client, redis.asyncio.cluster.RedisCluster)
        # On one Redis its connection bounds each send (Pipelined's timeout): no timer per command.
        self._scripts = redis_conn.scripts_via(client, timeout_s=redis_timeout_s)
        # On one Redis the results come over a pipelined connection of their own: it blocks in XREAD.
        self._results = Pipelined(reader.connection_pool) if isinstance(reader, redis.asyncio.Redis) else None
        self._send = client.register_script(_SEND_AND_RECORD if self._one_redis else _SEND)
        self._record = client.register_script(_RECORD)
        self.scripts = [self._send] if self._one_redis else [self._send, self._record]
        self._pending: dict[str, _Waiter] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # Set while Redis is away, as it may come back empty (restarted), without the result stream.
        self._results_unsure = False

    async def start(self) -> None:
        """Open the result stream, then read it on a task of its own.

        Agents answer with XADD NOMKSTREAM, so a command sent before the stream exists would have
        its results dropped: the stream is made before the first request can be served. If Redis
        is unreachable now, the task or the first request makes it once Redis answers.
        """
        opened = "0-0"
        try:
            opened = await self._create_results_stream(self._reader)
        except REDIS_DOWN:
            self._results_unsure = True
        # The reader task uses only its own client: cancelling it midway through a command
        # leaves that connection unusable, and nothing else must depend on it.
        self._task = asyncio.create_task(self._read_results(opened), name="kvbus-results")

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for pipelined in (self._scripts, self._results):
            if isinstance(pipelined, Pipelined):
                await pipelined.aclose()
        with contextlib.suppress(redis.RedisError):  # otherwise it expires by itself
            await self._redis.unlink(self.results_key)

    async def request(
        self,
        instance_id: str,
        kind: CommandKind,
        event_id: str,
        *,
        extended: Callable[[float], None] | None = None,
        **fields: Any,
    ) -> Outcome:
        """Send a command to every worker of `instance_id` and wait for all their results.

        Raises UnknownInstance, AgentTimeout naming the silent workers (within `timeout_s` and
        SILENCE_S), or BusUnavailable when Redis does not take the command within `redis_timeout_s`.
        A long command's workers sign that they are still working; each sign moves the wait's end to
        `timeout_s` after it, and `extended` is told the new end (in loop time).
        The results may still carry errors or refusals: what they mean depends on the command.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        command = Command(
            event_id=event_id, kind=kind, reply_to=self.results_key, timeout_ms=int(self.timeout_s * 1000), **fields
        )
        waiter = _Waiter()
        self._pending[event_id] = waiter
        try:
            if self._results_unsure:
                await self._reopen_results(event_id)
            settings = msgspec.json.encode(self._settings(command, instance_id)).decode()
            sent = await self._deliver(command, instance_id, settings)
            # On a cluster the record is written while the workers run the command: it costs the answer no time.
            recording = (
                None
                if self._one_redis
                else asyncio.ensure_future(self._write_record(command, instance_id, sent, settings))
            )
            try:
                if not sent.delivered:
                    raise _not_sent(instance_id, sent, event_id)
                waiter.expect(set(sent.workers))
                await self._await_results(waiter, started, extended)
            finally:
                if recording is not None:
                    await recording
        except TimeoutError:
            raise AgentTimeout(await self._silence(instance_id, waiter, started), event_id=event_id) from None
        finally:
            self._pending.pop(event_id, None)
        return Outcome(event_id, instance_id, dict(sorted(waiter.results.items())))

    async def _await_results(self, waiter: _Waiter, started: float, extended: Callable[[float], None] | None) -> None:
        """Until every result is in (TimeoutError otherwise): `timeout_s` from the send or from the newest
        sign of work, and at most LONGEST_COMMAND_TIMEOUTS times `timeout_s` from the send. One timer checks
        at the wait's end whether a sign moved it, and sets itself again if so: an asyncio.wait or a timeout
        context per command would cost its request more than the check."""
        loop = asyncio.get_running_loop()
        longest = started + self.timeout_s * LONGEST_COMMAND_TIMEOUTS
        told = started + self.timeout_s
        timer: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal told, timer
            if waiter.done.done():
                return
            deadline = min(max(started, waiter.working_at) + self.timeout_s, longest)
            if deadline > told and extended is not None:
                extended(deadline)
                told = deadline
            if deadline <= loop.time():
                waiter.done.set_exception(TimeoutError())
            else:
                timer = loop.call_at(deadline, check)

        timer = loop.call_at(told, check)
        try:
            await waiter.done
        finally:
            timer.cancel()  # the last one set

    async def _reopen_results(self, event_id: str) -> None:
        """Make sure the result stream exists, making it again if Redis came back without it.

        Agents answer with XADD NOMKSTREAM, and after an outage the reader task makes the stream again only at its
        next try, up to its longest backoff later: an agent that re-registered first would have its answers to
        the commands sent meanwhile dropped, and their requests would wait out command_timeout for nothing.
        Raises what Redis raised, or BusUnavailable after `redis_timeout_s`."""
        try:
            async with asyncio.timeout(self.redis_timeout_s):
                if not await self._redis.expire(self.results_key, RESULTS_TTL_S):
                    await self._create_results_stream(self._redis)
        except (TimeoutError, redis.TimeoutError):
            raise redis_stalled(self.redis_timeout_s, event_id=event_id) from None
        self._results_unsure = False

    async def _deliver(self, command: Command, instance_id: str, settings: str) -> _Sent:
        """Put the command on the instance's stream, unless the instance is unknown (UnknownInstance) or has no
        heartbeat (not sent); on one Redis, record and journal it in the same script. BusUnavailable after
        `redis_timeout_s`: the command may have reached Redis all the same (its bytes were written), so the
        503 carries the event id /check_finish knows it by."""
        minid = str(int(time.time() * 1000) - COMMAND_RETENTION_MS)
        send_keys = [keys.workers(instance_id), keys.commands(instance_id), keys.alive(instance_id)]
        fields = _flat(encode(command))
        args: list[str | int]
        if self._one_redis:
            send_keys += [*self._record_keys(command), keys.JOURNAL]
            args = [settings, minid, *fields]
        else:
            args = [minid, *fields]
        try:
            if self._one_redis:
                reply = await redis_conn.run_script(self._scripts, self._send, send_keys, args, None)
            else:
                async with asyncio.timeout(self.redis_timeout_s):
                    reply = await redis_conn.run_script(self._scripts, self._send, send_keys, args, None)
        except (TimeoutError, redis.TimeoutError):
            then = "; the command may still reach the instance once Redis answers: /check_finish tells"
            raise redis_stalled(self.redis_timeout_s, then, event_id=command.event_id) from None
        if not reply:
            raise UnknownInstance(
                f"unknown instance_id {instance_id!r}: no agent has registered it "
                "(check enable_controller and redis_url in the engine's config)"
            )
        state, sent_ms, *workers = cast(list[Any], reply)
        return _Sent(state == "sent", int(sent_ms), sorted(int(w) for w in workers))

    @staticmethod
    def _record_keys(command: Command) -> list[str]:
        return [keys.command_record(command.event_id), keys.command_records(keys.command_shard(command.event_id))]

    async def _write_record(self, command: Command, instance_id: str, sent: _Sent, settings: str) -> None:
        """On a cluster: write the command's record and journal entry, within `redis_timeout_s`. A failure costs
        only /check_finish its answer for this command (a 404), never the command: it is logged, not raised."""
        record_keys = self._record_keys(command)
        answer = json.dumps(["sent" if sent.delivered else "down", sent.at_ms, *map(str, sent.workers)])
        journal = JournaledCommand.of(command, instance_id)
        try:
            async with asyncio.timeout(self.redis_timeout_s):
                # One round trip (a cluster pipeline sends to each node at once).
                pipe = self._redis.pipeline(transaction=False)
                pipe.evalsha(self._record.sha, len(record_keys), *record_keys, settings, answer)
                pipe.xadd(keys.JOURNAL, journal, maxlen=keys.JOURNAL_MAXLEN, approximate=True)
                recorded, _ = await pipe.execute(raise_on_error=False)
                if isinstance(recorded, redis.exceptions.NoScriptError):
                    await self._record(keys=record_keys, args=[settings, answer])  # loads it where Redis lost it
                elif isinstance(recorded, Exception):
                    raise recorded
        except _FAILED as exc:
            log.warning("no record of %s for /check_finish: %s", command.event_id, exc or "Redis did not answer")

    def _settings(self, command: Command, instance_id: str) -> dict[str, Any]:
        """What the record script needs, and the command's journal entry; numbers Redis reads go as text."""
        deadline_field, workers_field = CommandRecord.SCRIPT_FIELDS
        return {
            "event_id": command.event_id,
            "timeout_ms": command.timeout_ms,
            "journal": _flat(JournaledCommand.of(command, instance_id)),
            "journal_maxlen": keys.JOURNAL_MAXLEN,
            "record": _flat(CommandRecord.sent(command, instance_id)),
            "deadline_field": deadline_field,
            "workers_field": workers_field,
            "not_sent": CommandRecord.result_value(RecordedResult(status=ResultStatus.EXPIRED, detail=NOT_SENT)),
            "retention_ms": str(self.event_retention_ms),
            "keep": -(-self.event_retention_count // keys.COMMAND_SHARDS),
            "trim_step": TRIM_STEP,
            "record_prefix": keys.command_record_prefix(keys.command_shard(command.event_id)),
        }

    async def _silence(self, instance_id: str, waiter: _Waiter, started: float) -> str:
        silent = sorted((waiter.expected or set()) - waiter.results.keys())
        answered = f" (workers {sorted(waiter.results)} answered)" if waiter.results else ""
        if waiter.working_at > started:
            within = (
                f"{asyncio.get_running_loop().time() - started:.1f} s: it was still working "
                f"{waiter.working_at - started:.1f} s in, then fell silent or reached the longest a command "
                f"may run ({LONGEST_COMMAND_TIMEOUTS} x command_timeout)"
            )
        else:
            within = f"{self.timeout_s:g} s"
        waited = f"worker {', '.join(map(str, silent))} of {instance_id!r} did not answer within {within}{answered}"
        try:
            async with asyncio.timeout(SILENCE_S):
                alive = await self._redis.exists(keys.alive(instance_id))
        except _FAILED:
            return f"{waited}, and Redis became unreachable meanwhile"
        if alive:
            return f"{waited}; its heartbeat is fresh, so it is alive but busy or stuck"
        return f"{waited}; it has no heartbeat: its engine is down or cannot reach Redis"

    async def _read_results(self, opened: str) -> None:
        last_id = opened
        next_refresh = time.monotonic() + _TTL_REFRESH_S if opened != "0-0" else 0.0
        outage = Outage(log, f"reading result stream {self.results_key}", backoff_s=0.2, max_backoff_s=1.0)
        # redis-py can swallow a cancellation midway through a command, so the flag ends the loop too.
        while not self._closing:
            try:
                if time.monotonic() >= next_refresh:
                    if not await self._reader.expire(self.results_key, RESULTS_TTL_S):
                        await self._create_results_stream(self._reader)
                        # All of a new stream is unread, including what came after a request made it (one may
                        # have made it just before this did).
                        last_id = "0-0"
                    self._results_unsure = False
                    next_refresh = time.monotonic() + _TTL_REFRESH_S
                entries = await self._read_entries(last_id)
            except REDIS_DOWN as exc:
                if self._closing:
                    return
                # Redis may have restarted empty: the stream is made again first, here or by the next request.
                self._results_unsure = True
                next_refresh = 0.0
                await asyncio.sleep(outage.failed(exc))
                with contextlib.suppress(*REDIS_DOWN):
                    await redis_conn.heal(self._reader)
                continue
            outage.succeeded()
            for entry_id, fields in entries:
                last_id = entry_id
                if fields is not None:  # XREAD reads no pending entries: never None here
                    self._resolve(fields)

    async def _read_entries(self, last_id: str) -> list[Entry]:
        """The result stream's entries after `last_id`, waiting up to BLOCK_MS for one."""
        read = ("XREAD", "COUNT", 512, "BLOCK", BLOCK_MS, "STREAMS", self.results_key, last_id)
        if self._results is None:
            reply = await self._reader.execute_command(*read, **await redis_conn.routed(self._reader, self.results_key))
            return cast(list[tuple[str, list[Entry]]], reply)[0][1] if reply else []
        return stream_entries(await self._results.call(pack(read)))

    async def _create_results_stream(self, client: redis_conn.AsyncClient) -> str:
        pipe = client.pipeline(transaction=False)
        pipe.xadd(self.results_key, ResultsOpened(controller=self.controller_id).encode())
        pipe.expire(self.results_key, RESULTS_TTL_S)
        entry_id, _ = await pipe.execute()
        log.info("result stream %s ready", self.results_key)
        return str(entry_id)

    def _resolve(self, fields: dict[str, str]) -> None:
        try:
            result = decode_result(fields)
        except DecodeError as exc:
            log.error("ignoring undecodable result on %s: %s", self.results_key, exc)
            return
        if result is None:
            return
        waiter = self._pending.get(result.event_id)
        if waiter is None:
            return
        if isinstance(result, Working):
            waiter.working()
        else:
            waiter.add(result)
