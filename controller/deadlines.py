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

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvbus.controller.bus import SILENCE_S
from kvbus.controller.errors import redis_stalled, response
from kvbus.controller.metrics import COMMAND_PATHS

log = logging.getLogger("kvbus.controller")


def _has_body(scope: Scope) -> bool:
    headers = Headers(scope=scope)
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


_TIMEOUT = "kvbus.deadline"  # the scope key of the request's asyncio.Timeout


def extend(scope: Scope, until: float) -> None:
    """Let a command whose workers say they are still at it (bus.request's `extended`) run past the request's
    budget: to `until` (loop time) and the bus's heartbeat check after it."""
    timeout: asyncio.Timeout | None = scope.get(_TIMEOUT)
    when = None if timeout is None else timeout.when()
    if timeout is not None and when is not None:
        timeout.reschedule(max(when, until + 2 * SILENCE_S))


class Deadlines:
    """Answers 503 for a request still running when its budget is spent."""

    def __init__(self, app: ASGIApp, *, redis_timeout_s: float, command_timeout_s: float) -> None:
        self.app = app
        self._query_s = redis_timeout_s
        # The bus answers a command itself within command_timeout and its heartbeat check; this is the
        # bound over the work before the command goes out (a /move's peers and tickets).
        self._command_s = command_timeout_s + 2 * SILENCE_S

    def budget_s(self, path: str) -> float:
        return self._command_s if path in COMMAND_PATHS else self._query_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        budget = self.budget_s(scope["path"])
        loop = asyncio.get_running_loop()
        timeout = asyncio.timeout_at(None if _has_body(scope) else loop.time() + budget)
        scope[_TIMEOUT] = timeout
        started = False

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body") and timeout.when() is None:
                timeout.reschedule(loop.time() + budget)  # the whole body is in: the request's own work begins
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            async with timeout:
                await self.app(scope, receiving, sending)
        except TimeoutError:
            if not timeout.expired() or started:
                raise  # not this deadline's, or too late to answer anything else
            log.warning("%s %s -> 503: no answer within %g s", scope["method"], scope["path"], budget)
            await response(redis_stalled(budget))(scope, receive, send)
