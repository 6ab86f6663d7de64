"""Tells the controller that waits for a long command that this worker is still running it.

A command on many chunks (a /compress of a whole location, a /move over a slow link) can take longer
than `command_timeout`, more so on a loaded machine. While one runs, a thread of its own puts a
`Working` sign on the command's result stream every `interval`, the first one `interval` after the
command began, so a short command sends none. The controller waits `command_timeout` from the newest
sign instead of answering 504 while the work goes on; its own bound (a dozen command_timeouts) ends a
handler that never returns. The thread sleeps on a condition while no command runs, and a command
wakes it only when it was idle: an idle agent pays nothing for it, a busy one about a wake-up a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kvbus.shared import redis_conn
from kvbus.shared.messages import Command
from kvbus.shared.records import Working
from kvbus.shared.replies import RESULTS_MAXLEN

log = logging.getLogger("kvbus.agent.working")

INTERVAL_S = 1.0
_SHARE_OF_TIMEOUT = 4  # at least this many signs within one command_timeout, for short timeouts


class WorkingSigns:
    def __init__(self, client: redis_conn.Client, worker_id: int, *, interval_s: float = INTERVAL_S) -> None:
        self._redis = client
        self._worker = worker_id
        self._interval = interval_s
        self._changed = threading.Condition()
        self._command: Command | None = None
        self._began = 0.0
        self._due = 0.0  # when the command in hand's next sign falls due (monotonic)
        self._idle = False  # the thread waits for a command to begin, with no timeout
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"kvbus-working-{self._worker}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @contextmanager
    def running(self, command: Command) -> Iterator[None]:
        """Sign for `command` while the body runs."""
        with self._changed:
            self._command, self._began = command, time.monotonic()
            self._due = self._began + self._every(command)
            if self._idle:
                self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                # The thread finds out when the sign falls due: waking it now would cost every command a wake-up.
                self._command = None

    def _every(self, command: Command) -> float:
        return min(self._interval, command.timeout_ms / 1000 / _SHARE_OF_TIMEOUT)

    def _run(self) -> None:
        while (due := self._next_sign()) is not None:
            self._sign(*due)

    def _next_sign(self) -> tuple[Command, float] | None:
        """Wait until the command in hand has run one more interval; None once stopping. The thread wakes
        when a command begins while it is idle and when a sign falls due (signing only if a command still
        runs then): under a stream of short commands, about once an interval. The Redis write is the
        caller's, outside the lock, so a command ending never waits for it."""
        with self._changed:
            while not self._stopping:
                # Until the last sign due, even when its command already ended: the next command, most
                # likely as short, then begins without waking the thread.
                early = self._due - time.monotonic()
                if early > 0:
                    self._changed.wait(early)
                    continue
                if self._command is None:
                    self._idle = True
                    self._changed.wait()
                    self._idle = False
                    continue
                self._due += self._every(self._command)
                return self._command, time.monotonic() - self._began
            return None

    def _sign(self, command: Command, working_s: float) -> None:
        sign = Working(event_id=command.event_id, worker_id=self._worker, working_ms=int(working_s * 1000))
        try:
            # NOMKSTREAM: a result stream that is gone belongs to a controller that is gone.
            self._redis.xadd(command.reply_to, sign.encode(), maxlen=RESULTS_MAXLEN, approximate=True, nomkstream=True)
        except redis_conn.ERRORS as exc:
            log.warning("could not tell the controller that %s is still running: %s", command.event_id, exc)
