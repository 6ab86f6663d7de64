"""One connection to a single Redis that many coroutines share, each command written the moment it is called.

Redis answers a connection's commands in the order they came, so the replies resolve the callers' futures
in that order, straight from the event loop's read callback: no task of its own, no pool to take a
connection from and give back to, and concurrent callers' commands and replies share syscalls. redis-py's
asyncio client spends ~30 us of CPU a call on that bookkeeping for a packed script and ~100 us for an XREAD
it encodes and parses itself, on the path of every command the controller sends. redis-py still opens the
connection (address, TLS, AUTH, SELECT, protocol) before this takes it over.

A caller that stops waiting (a timeout) keeps its place in the order, and its reply is dropped when it
comes. When the oldest command on the connection has waited past its timeout (the client's socket timeout,
or a shorter one it was given), the connection is dropped and every caller on it fails, as redis-py drops a
connection whose read timed out; the next call opens a new one, within the same timeout. One timer serves
every caller that way, where a timeout per call would set and cancel one per command. A blocking command
(XREAD BLOCK) holds up the commands after it, so a connection that sends one sends nothing else.

A connection that has carried nothing for the pool's health-check interval is replaced before its next
command: a firewall or NAT may have dropped it silently meanwhile, and that command would only fail after
the socket timeout. redis-py's own pool PINGs such a connection first, at a round trip before the command
and the same wait when the connection is gone; opening a new one costs its handshake, once per quiet spell.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, cast

import hiredis
import redis
import redis.asyncio
import redis.asyncio.connection
import redis.commands.core
from redis.connection import BaseParser

from kvbus.shared.resp import pack

_MORE = object()  # what the reader gives while a reply is still incomplete


class _Protocol(asyncio.Protocol):
    """The connection once taken over: the callers waiting on it, oldest first, with when each sent."""

    def __init__(self, writer: asyncio.StreamWriter, reader: hiredis.Reader, opened_at: float) -> None:
        self.writer = writer  # kept: collecting a StreamWriter closes its transport
        self.transport = cast(asyncio.Transport, writer.transport)
        self.reader = reader
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.lost: Exception | None = None
        self.sent_at = opened_at  # loop time of the last write

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._out_of_step(f"unparsable reply ({exc})")
                return
            if reply is _MORE:
                return
            if not self.waiting:
                self._out_of_step("a reply no command was waiting for")
                return
            future, _ = self.waiting.popleft()
            if future.done():
                continue  # its caller stopped waiting
            if isinstance(reply, redis.RedisError):  # an error reply, typed by redis-py's own rule
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _out_of_step(self, what: str) -> None:
        """Replies can no longer be matched to commands: every caller fails and the next call reconnects."""
        self.fail(redis.ConnectionError(f"Redis connection out of step: {what}"))
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis.ConnectionError(f"Error while reading from Redis: {exc or 'connection closed by server'}"))

    def fail(self, error: Exception) -> None:
        if self.lost is None:
            self.lost = error
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class Pipelined:
    """Opens on first use, from `pool`'s settings; its own connection, never one of the pool's."""

    def __init__(self, pool: redis.asyncio.ConnectionPool, *, timeout_s: float | None = None) -> None:
        """`timeout_s`: how long a call may wait for its reply, or for the connection to open, before it fails with
        redis.TimeoutError; the pool's socket timeout by default. It bounds each call with no timer of its own."""
        self._pool = pool
        self._protocol: _Protocol | None = None
        self._opening = asyncio.Lock()
        timeout = timeout_s or pool.connection_kwargs.get("socket_timeout")
        self._timeout_s: float | None = float(timeout) if timeout else None
        quiet = pool.connection_kwargs.get("health_check_interval")
        self._quiet_s: float | None = float(quiet) if quiet else None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    async def call(self, command: bytes) -> Any:
        """Send one command, packed already, and await its reply; see `batch`."""
        return (await self.batch([command]))[0]

    async def batch(self, commands: list[bytes]) -> list[Any]:
        """Send `commands`, packed already, in one write and await their replies, in order. The first error reply
        is raised, as redis-py raises it, once every reply is in; a lost connection raises redis.ConnectionError,
        no reply within the socket timeout redis.TimeoutError. Commands whose connection was lost are sent once
        more on a new one, as redis-py retries: after a Redis restart, the first call finds the old connection
        dead. (Everything kvbus sends this way is safe to repeat: a command's second delivery is answered from
        its first, by event id.)"""
        try:
            return await self._send(commands)
        except redis.ConnectionError:
            return await self._send(commands)

    async def _send(self, commands: list[bytes]) -> list[Any]:
        loop = asyncio.get_running_loop()
        protocol = self._protocol
        if protocol is None or not self._usable(protocol, loop.time()):
            protocol = await self._open()
        now = protocol.sent_at = loop.time()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in commands]
        protocol.waiting.extend((future, now) for future in futures)
        protocol.transport.write(commands[0] if len(commands) == 1 else b"".join(commands))
        if self._watchdog is None and self._timeout_s is not None:
            self._watchdog = loop.call_at(now + self._timeout_s, self._watch)
        replies: list[Any] = []
        refused: redis.ResponseError | None = None
        try:
            for future in futures:
                try:
                    replies.append(await future)
                except redis.ResponseError as exc:  # an error reply: the replies after it still come
                    refused = refused or exc
                    replies.append(exc)
        finally:
            for future in futures:  # a caller that stopped waiting drops the rest; a failure is seen once
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()
        if refused is not None:
            raise refused
        return replies

    async def run_script(self, script: redis.commands.core.AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        """`script(keys=keys, args=args)`, loading the script first where Redis lost it (a restart)."""
        command = pack(("EVALSHA", script.sha, len(keys), *keys, *args))
        try:
            return await self.call(command)
        except redis.exceptions.NoScriptError:
            await self.call(pack(("SCRIPT", "LOAD", cast(str | bytes, script.script))))
            return await self.call(command)

    def _watch(self) -> None:
        """Drop the connection if its oldest caller waited past the socket timeout; else look again when it would."""
        self._watchdog = None
        protocol = self._protocol
        if protocol is None or protocol.lost is not None or not protocol.waiting or self._timeout_s is None:
            return
        loop = asyncio.get_running_loop()
        due = protocol.waiting[0][1] + self._timeout_s
        if loop.time() < due:
            self._watchdog = loop.call_at(due, self._watch)
            return
        protocol.fail(redis.TimeoutError(f"Timeout reading from Redis: no reply within {self._timeout_s:g} s"))
        protocol.transport.abort()

    def _usable(self, protocol: _Protocol, now: float) -> bool:
        """Not lost, and not quiet for so long that it may be gone without a word (see the module's doc)."""
        if protocol.lost is not None:
            return False
        return self._quiet_s is None or bool(protocol.waiting) or now - protocol.sent_at < self._quiet_s

    async def _open(self) -> _Protocol:
        if self._closed:
            raise redis.ConnectionError("this connection was closed")
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._take_over()
        except TimeoutError:
            raise redis.TimeoutError(f"Timeout connecting to Redis: not open within {self._timeout_s:g} s") from None

    async def _take_over(self) -> _Protocol:
        async with self._opening:
            loop = asyncio.get_running_loop()
            old = self._protocol
            if old is not None and self._usable(old, loop.time()):
                return old  # another caller opened it meanwhile
            if old is not None and old.lost is None:
                old.lost = redis.ConnectionError("replaced after a quiet spell")
                old.transport.close()
            make: Callable[[], redis.asyncio.connection.AbstractConnection] = self._pool.make_connection
            connection = make()
            connect: Callable[[], Awaitable[None]] = connection.connect  # redis-py leaves it unannotated
            try:
                await connect()
            except BaseException:  # a timeout, say: the socket it may have opened goes with it
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)
                raise
            # Taken over: the transport delivers to this module's protocol from here on, and redis-py's connection
            # object lets go of it (as its own close does), or collecting that object would close the connection.
            writer = cast(asyncio.StreamWriter, connection._writer)  # noqa: SLF001
            connection._writer = connection._reader = None  # noqa: SLF001
            encoder = connection.encoder
            text = {"encoding": encoder.encoding, "errors": encoder.encoding_errors} if encoder.decode_responses else {}
            reader = hiredis.Reader(replyError=BaseParser.parse_error, notEnoughData=_MORE, **text)
            protocol = _Protocol(writer, reader, loop.time())
            protocol.transport.set_protocol(protocol)
            self._protocol = protocol
            return protocol

    async def aclose(self) -> None:
        self._closed = True
        protocol, self._protocol = self._protocol, None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if protocol is not None:
            protocol.fail(redis.ConnectionError("connection closed by kvbus"))
            protocol.transport.close()
        await asyncio.sleep(0)  # let the transport's close run before the loop may end
