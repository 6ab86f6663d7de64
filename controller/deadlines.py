"""Every HTTP request ends within its deadline, however Redis behaves.

A stalled Redis (stopped, swapping, a network that drops packets) answers nothing, and redis-py's
socket timeouts and retries held each request for 15 s before its 503. The handlers bound their own
waits where they can say more (bus.py: a command's send, its answer, the check of a heartbeat;
metrics.py: the fleet read of a scrape); this middleware is the bound over the whole request, and
the answer when nothing inside said anything sooner: a 503 once the budget is spent. Lookups,
queries and every other request get `redis_timeout`; commands `command_timeout`, plus the bus's
short check of the instance's heartbeat that names why a 504 happened. The budget counts from the
moment the request's body has arrived: a client's slow upload is no Redis stall.

Cancelling a request midway through a Redis call is safe: redis-py's asyncio connection
disconnects when a read or write is interrupted (any BaseException, CancelledError included), so
no connection goes back to the pool with an unread answer waiting on it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvbus.controller.bus import SILENCE_S
from kvbus.controller.errors import redis_stalled, response
from kvbus.controller.metrics import COMMAND_PATHS

log = logging.getLogger("kvbus.controller")


def _has_body(scope: Scope) -> bool:
    length, chunked = b"0", False
    for name, value in scope["headers"]:  # ASGI servers give header names in lower case
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            chunked = True
    return length != b"0" or chunked


_DEADLINE = "kvbus.deadline"  # the scope key of the request's _Running


class _Running:
    """A request under its deadline: `due` in loop time, None until its body is in."""

    __slots__ = ("budget", "cancelling", "due", "expired", "task", "timer")

    def __init__(self, task: asyncio.Task[object], budget: _Budget) -> None:
        self.task = task
        self.budget = budget
        self.cancelling = task.cancelling()  # cancellations already asked for, by others: not this deadline's
        self.due: float | None = None
        self.expired = False
        self.timer: asyncio.TimerHandle | None = None  # its own, once extended past its budget's order

    def expire(self) -> None:
        self.expired = True
        self.task.cancel()


class _Budget:
    """The requests of one event loop running under one budget, oldest first, and one timer, set for the oldest's
    deadline: every deadline is its start plus the same budget, so the oldest is always the first due. (A timer
    set and cancelled per request, as asyncio.timeout does, cost the controller a tenth of its CPU at 32
    requests in flight.) A request extended past its budget leaves the order for a timer of its own."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._running: dict[_Running, None] = {}  # in the order they started, so in the order they are due
        # Whether the timer is set. Only a flag: the handle would hold the loop, which Deadlines holds weakly.
        self._armed = False

    def start(self, running: _Running) -> None:
        loop = asyncio.get_running_loop()
        running.due = loop.time() + self.seconds
        self._running[running] = None
        if not self._armed:
            self._armed = True
            loop.call_at(running.due, self._expire)

    def stop(self, running: _Running) -> None:
        """Its answer is out, or it failed: its deadline no longer applies. The timer stays for the next due."""
        self._running.pop(running, None)
        if running.timer is not None:
            running.timer.cancel()

    def extend(self, running: _Running, due: float) -> None:
        self.stop(running)  # out of the order, and any timer of its own replaced
        running.due = due
        running.timer = asyncio.get_running_loop().call_at(due, running.expire)

    def _expire(self) -> None:
        self._armed = False
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._running:
            oldest = next(iter(self._running))
            assert oldest.due is not None
            if oldest.due > now:
                self._armed = True
                loop.call_at(oldest.due, self._expire)
                return
            del self._running[oldest]
            oldest.expire()


def extend(scope: Scope, until: float) -> None:
    """Let a command whose workers say they are still at it (bus.request's `extended`) run past the request's
    budget: to `until` (loop time) and the bus's heartbeat check after it."""
    running: _Running | None = scope.get(_DEADLINE)
    if running is not None and running.due is not None:
        running.budget.extend(running, max(running.due, until + 2 * SILENCE_S))


class Deadlines:
    """Answers 503 for a request still running when its budget is spent."""

    def __init__(self, app: ASGIApp, *, redis_timeout_s: float, command_timeout_s: float) -> None:
        self.app = app
        self._query_s = redis_timeout_s
        # The bus answers a command itself within command_timeout and its heartbeat check; this is the
        # bound over the work before the command goes out (a /move's peers and tickets).
        self._command_s = command_timeout_s + 2 * SILENCE_S
        # Per event loop: uvicorn runs one, but an app may be served by several in turn (tests do).
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[_Budget, _Budget]] = (
            weakref.WeakKeyDictionary()
        )

    def _budget(self, loop: asyncio.AbstractEventLoop, path: str) -> _Budget:
        budgets = self._loops.get(loop)
        if budgets is None:
            budgets = self._loops[loop] = (_Budget(self._query_s), _Budget(self._command_s))
        return budgets[path in COMMAND_PATHS]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        budget = self._budget(asyncio.get_running_loop(), scope["path"])
        running = scope[_DEADLINE] = _Running(task, budget)
        if not _has_body(scope):
            budget.start(running)
        started = False

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body") and running.due is None:
                budget.start(running)  # the whole body is in: the request's own work begins
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        except asyncio.CancelledError:
            # Another's cancellation, as asyncio.timeout tells them apart: it goes on as it came.
            if not running.expired or task.uncancel() > running.cancelling:
                raise
            if started:  # too late to answer anything else
                raise TimeoutError(f"{scope['path']}: no end within {budget.seconds:g} s") from None
            log.warning("%s %s -> 503: no answer within %g s", scope["method"], scope["path"], budget.seconds)
            await response(redis_stalled(budget.seconds))(scope, receive, send)
        finally:
            budget.stop(running)
