"""Reads this worker's commands from its instance's stream and answers each exactly once.

For each batch read together: run each command's handler (which detaches buffers and queues
index changes), have the index written, then in one write: record each result under a
`done` key and in the command's event record (which /check_finish reads), XADD it to the
result stream its command names and to the journal, and XACK the batch. Only then does
`after_reply` run (the agent frees what the batch cleared), so no answer waits for that. On its
own connection, the thread sends that write together with its read of the next commands, and the
index's pending writes go in the same write, ahead of the answer: Redis applies them before the
answer is visible, without a round trip of their own. Elsewhere (a cluster, a drain of pending
commands) the index is flushed in a round trip of its own before the answer is sent.
A write of an answer that Redis refuses (out of memory, say) is logged, and the thread goes on: its
caller gets no answer before its deadline, but the agent still answers the commands after it.
On a single Redis the thread reads and answers over one connection of its own, with its commands
packed by hiredis: a redis-py call or pipeline costs the engine that hosts the agent 30-100 us of
CPU per round trip in Python bookkeeping alone, several times what the bytes cost. On a cluster,
whose keys live on several nodes, it goes through the cluster client.
Delivery is at least once, so:
- a redelivery in this process reuses the result it already computed;
- a redelivery after a restart finds the `done` key and is only acked;
- a command past its deadline is answered "expired" and changes nothing, or, if it is a
  redelivery (it may have been answered before), only acked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import redis

from kvbus.agent.index_writer import IndexWriter
from kvbus.agent.own_connection import OwnConnection
from kvbus.shared import keys, redis_conn
from kvbus.shared.flat_fields import DecodeError, decode, encode
from kvbus.shared.messages import Command, CommandKind, Result, ResultStatus
from kvbus.shared.outage import Outage
from kvbus.shared.redis_conn import BLOCK_MS, IDLE_BLOCK_MS
from kvbus.shared.replies import Args, deadline_ms, reply_commands
from kvbus.shared.resp import Entry, stream_entries

log = logging.getLogger("kvbus.agent.consumer")

_REMEMBERED_RESULTS = 10_000
_LOGGED_FROM_S = 0.1  # a command that took this long is logged at INFO, the rest at DEBUG

Handler = Callable[[Command], Result]


class CommandConsumer:
    def __init__(
        self,
        client: redis_conn.Client,
        *,
        instance_id: str,
        worker_id: int,
        handler: Handler,
        before_reply: Callable[[], None],
        now_ms: Callable[[], int],
        after_reply: Callable[[], None] = lambda: None,
        running: Callable[[Command], AbstractContextManager[None]] = lambda command: nullcontext(),
        count: int = 32,
        event_retention_s: float = 3600.0,
        index: IndexWriter | None = None,
    ) -> None:
        self._redis = client
        self._instance = instance_id
        self._worker = worker_id
        self._handler = handler
        self._before_reply = before_reply
        self._after_reply = after_reply
        self._running = running  # around each handler call: signs to the controller while a long one runs
        self._now_ms = now_ms
        self._count = count
        self._event_retention_s = max(int(event_retention_s), 1)
        self._stream = keys.commands(instance_id)
        self._group = keys.command_group(worker_id)
        self._results: OrderedDict[str, Result] = OrderedDict()
        self._own = OwnConnection(client.connection_pool) if isinstance(client, redis.Redis) else None
        # Whose writes the own connection sends ahead of each answer instead of `before_reply`'s flush.
        self._index = index if self._own is not None else None
        # On the own connection the thread waits long for commands; `interrupt` ends the wait.
        self._wait = threading.Lock()
        self._waiting = False
        self._stopping = False

    def ensure_group(self) -> None:
        """Create this worker's group, from the stream's start, so no command sent before it is missed."""
        try:
            self._redis.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def rehearse(self) -> None:
        """Decode, run and answer a made-up health check, sending nothing (it changes nothing either): a first
        command would otherwise pay for inspecting the message types and for its first pass through this code
        (5 ms of CPU against 0.3 ms), and a fleet's agents all meet their first commands in the same burst."""
        made_up = Command(event_id="rehearsal", kind=CommandKind.HEALTH, reply_to=self._stream, timeout_ms=1)
        command = decode(Command, encode(made_up))
        reply_commands(command, self._handler(command), retention_s=self._event_retention_s)

    def drain_pending(self) -> int:
        """Answer what this worker had read but not acked (a previous run crashed); returns how many."""
        total = 0
        while entries := self._read("0", block_ms=None):
            self._answer(entries, redelivered=True)
            total += len(entries)
        return total

    def poll(self, block_ms: int = BLOCK_MS) -> int:
        """Wait up to `block_ms` for new commands and answer them; returns how many."""
        entries = self._read(">", block_ms=block_ms)
        if entries:
            self._answer(entries, redelivered=False)
        return len(entries)

    def run(self, stop: threading.Event, on_lost_group: Callable[[], None]) -> None:
        """The loop of the consumer thread: pending entries first, then new ones, until `stop`."""
        outage = Outage(log, f"reading command stream {self._stream}", backoff_s=0.5, max_backoff_s=2.0)
        need_pending = True
        owed: list[Args] = []  # the last batch's answer, sent with the next read (own connection only)
        while not stop.is_set():
            try:
                if need_pending:
                    self.drain_pending()
                    need_pending = False
                if self._own is None:
                    self.poll()
                else:
                    owed = self._poll_answering(self._own, owed)
            except redis.ResponseError as exc:
                self._release_index()
                owed = []  # unacked, so its commands come back with the pending ones, their results remembered
                # NOGROUP: Redis restarted or was flushed. UNBLOCKED: the stream was deleted (reaped) while read.
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                log.warning("command stream %s lost its group (%s); re-registering", self._stream, exc)
                on_lost_group()
                need_pending = True
            except redis_conn.ERRORS as exc:
                self._release_index()
                owed = []
                need_pending = True
                if stop.is_set():
                    break  # an interrupted wait, most likely: nothing to report
                stop.wait(outage.failed(exc))
                continue
            outage.succeeded()
        if owed and self._own is not None:
            self._send_last(self._own, owed)

    def _poll_answering(self, own: OwnConnection, owed: list[Args]) -> list[Args]:
        """Send `owed` and the read of the next commands in one write; returns the answer to those commands.

        An answer goes out as soon as it is ready either way, since the thread reads right after it
        answers; sharing the write saves the thread a round trip and a wake-up per batch. (Sending answers on a
        second connection, to skip the wake-up for their replies, saved nothing: a write that wakes Redis
        costs the engine about as much CPU in the kernel as the wake-up it saves.)
        """
        read = self._read_args(">", IDLE_BLOCK_MS)
        if owed:
            self._send_after_index(own, [*owed, read])
            self._after_reply()
        else:
            own.send([read])
        with self._wait:
            self._waiting = True
            if self._stopping:
                own.interrupt()
        try:
            if owed:  # reported now: the read's reply may not come before the next command, or a stop
                self._report_refused(own.read(len(owed), raise_errors=False))
            (reply,) = own.read(1, raise_errors=False)
        finally:
            with self._wait:
                self._waiting = False
        if isinstance(reply, redis.ResponseError):
            raise reply
        entries = stream_entries(reply)
        return self._prepare(entries, redelivered=False, index_ahead=True) if entries else []

    def _report_refused(self, replies: list[Any]) -> None:
        refused = [reply for reply in replies if isinstance(reply, redis.ResponseError)]
        if refused:
            log.error(
                "Redis refused %d of an answer's %d writes on %s (first: %s): callers waiting on them get no "
                "answer before their deadline; see Redis's log and maxmemory",
                len(refused),
                len(replies),
                self._stream,
                refused[0],
            )

    def interrupt(self) -> None:
        """For a stopping agent, after setting `run`'s stop: end a wait for commands now rather than when its
        block (IDLE_BLOCK_MS) ends. Only a wait: a command in hand is still answered, and its answer sent."""
        with self._wait:
            self._stopping = True
            if self._waiting and self._own is not None:
                self._own.interrupt()

    def _send_after_index(self, own: OwnConnection, commands: list[Args]) -> None:
        """Send `commands` in one write after the index's pending writes, and hand the index their replies;
        the caller reads the replies of `commands`. Should the write fail, the index keeps its writes pending."""
        taken = self._index.take() if self._index is not None else None
        if taken is None:
            own.send(commands)
            return
        assert self._index is not None
        try:
            own.send(commands, ahead=taken.commands)
            answers = own.read(taken.replies, raise_errors=False)
        except BaseException:
            self._index.not_written(taken)
            raise
        self._index.written(taken, answers)

    def _release_index(self) -> None:
        """The batch whose index writes were to go with its answer is dropped: the index writes them itself."""
        if self._index is not None:
            self._index.release()

    def _send_last(self, own: OwnConnection, owed: list[Args]) -> None:
        try:
            self._send_after_index(own, owed)
            self._report_refused(own.read(len(owed), raise_errors=False))
        except redis_conn.ERRORS as exc:
            log.warning(
                "the last answers on %s were not sent (%s); their commands stay pending for the next start",
                self._stream,
                exc,
            )
            return
        self._after_reply()

    def _read(self, start: str, block_ms: int | None) -> list[Entry]:
        if self._own is None:
            reply = self._redis.xreadgroup(
                self._group, self._group, {self._stream: start}, count=self._count, block=block_ms
            )
            # One stream asked, so one (stream, entries) pair back; decode_responses makes every name text.
            return cast(list[tuple[str, list[Entry]]], reply)[0][1] if reply else []
        return stream_entries(self._own.call(*self._read_args(start, block_ms)))

    def _read_args(self, start: str, block_ms: int | None) -> Args:
        block: Args = () if block_ms is None else ("BLOCK", block_ms)
        return (
            "XREADGROUP",
            "GROUP",
            self._group,
            self._group,
            "COUNT",
            self._count,
            *block,
            "STREAMS",
            self._stream,
            start,
        )

    def _answer(self, entries: list[Entry], *, redelivered: bool) -> None:
        """Answer `entries` and send the answer at once."""
        writes = self._prepare(entries, redelivered=redelivered)
        try:
            if self._own is not None:
                self._report_refused(self._own.batch(writes, raise_errors=False))
            else:
                pipe = self._redis.pipeline(transaction=False)
                for args in writes:
                    pipe.execute_command(*args)
                self._report_refused(pipe.execute(raise_on_error=False))
        finally:
            self._after_reply()

    def _prepare(self, entries: list[Entry], *, redelivered: bool, index_ahead: bool = False) -> list[Args]:
        """Run each command and flush the index once, or with `index_ahead` leave the index's writes for the
        caller to send ahead of the answer; returns the writes of the answer: every result, record and
        journal entry, then the XACK of every entry."""
        index_ahead = index_ahead and self._index is not None
        if index_ahead:
            assert self._index is not None
            self._index.hold()
        replies: list[tuple[Command, Result]] = []
        for entry_id, fields in entries:
            command = self._command(entry_id, fields)
            if command is None:
                continue
            result = self._results.get(command.event_id)
            if result is None:
                if redelivered and self._answered_before(entry_id, command):
                    continue
                result = self._execute(entry_id, command)
                self._results[command.event_id] = result
                if len(self._results) > _REMEMBERED_RESULTS:
                    self._results.popitem(last=False)
            replies.append((command, result))
        if replies and not index_ahead:
            self._before_reply()
        writes = [
            args
            for command, result in replies
            for args in reply_commands(command, result, retention_s=self._event_retention_s)
        ]
        writes.append(("XACK", self._stream, self._group, *(entry_id for entry_id, _ in entries)))
        return writes

    def _command(self, entry_id: str, fields: dict[str, str] | None) -> Command | None:
        if not fields:
            return None  # trimmed while pending: nobody can be waiting for it any more
        try:
            return decode(Command, fields)
        except DecodeError as exc:
            log.error("dropping undecodable command %s on %s: %s", entry_id, self._stream, exc)
            return None

    def _answered_before(self, entry_id: str, command: Command) -> bool:
        if self._redis.exists(keys.done(self._instance, self._worker, command.event_id)):
            log.info("%s was answered before a restart; acking its redelivery", command.event_id)
            return True
        if self._late_ms(entry_id, command) > 0:
            log.info("%s redelivered past its deadline; acking it unanswered", command.event_id)
            return True
        return False

    def _late_ms(self, entry_id: str, command: Command) -> int:
        return self._now_ms() - deadline_ms(entry_id, command)

    def _execute(self, entry_id: str, command: Command) -> Result:
        late_ms = self._late_ms(entry_id, command)
        if late_ms > 0:
            log.warning(
                "%s %s arrived %d ms past its deadline; answering expired", command.kind, command.event_id, late_ms
            )
            return self._result(command, ResultStatus.EXPIRED, detail=f"arrived {late_ms} ms past its deadline")
        started = time.perf_counter()
        try:
            with self._running(command):
                result = self._handler(command)
        except Exception as exc:
            log.exception("%s %s failed", command.kind, command.event_id)
            return self._result(command, ResultStatus.ERROR, detail=f"{type(exc).__name__}: {exc}")
        elapsed_s = time.perf_counter() - started
        # Every answer is in the journal already; a line per command would cost the engine ~10 us each at INFO.
        log.log(
            logging.INFO if elapsed_s >= _LOGGED_FROM_S else logging.DEBUG,
            "%s %s %s: %d tokens in %.1f ms",
            command.kind,
            command.event_id,
            command.location,
            result.num_tokens,
            elapsed_s * 1000,
        )
        return result

    def _result(self, command: Command, status: ResultStatus, *, detail: str = "") -> Result:
        return Result(
            event_id=command.event_id, instance_id=self._instance, worker_id=self._worker, status=status, detail=detail
        )
