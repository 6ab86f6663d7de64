"""A connection of a single-node client's pool, taken for good by the one agent thread that uses it.

redis-py's client and pipeline cost 30-100 us of CPU per round trip in Python bookkeeping alone,
several times what the bytes cost, and an agent pays that inside the engine that hosts it. The
command and heartbeat threads talk to Redis often enough for that to count, so on a single Redis
each sends its commands packed by hiredis over a connection of its own, and parses the replies with
a hiredis reader of its own, straight from the socket (redis-py's per-reply wrapper costs ~7 us, and
a clear's answer has seven replies). redis-py's Connection still connects, authenticates and drops a
connection that failed (the next call reconnects); what is skipped is its per-command and per-reply work.
On a cluster, whose keys live on several nodes, those threads use the cluster client instead.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from typing import Any

import hiredis
import redis

from kvbus.shared import resp

Args = tuple[str | int | bytes, ...]  # a command: its name and arguments

_MORE = object()  # what the reader gives while a reply is still incomplete


class OwnConnection:
    """Errors are raised as the client would raise them; replies are RESP as decoded by the client's
    settings, not shaped by redis-py's per-command callbacks."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._conn: Any = None  # taken at first use: Redis may be away when the agent is built
        self._sock: Any = None  # the socket `_reader` parses: a new one (a reconnect) gets a new reader
        self._reader: Any = None
        self._buffer = bytearray(65536)

    def call(self, *args: str | int | bytes) -> Any:
        return self.batch([args])[0]

    def batch(self, commands: Sequence[Args], *, raise_errors: bool = True) -> list[Any]:
        """Send `commands` in one write and read their replies (see `read`)."""
        self.send(commands)
        return self.read(len(commands), raise_errors=raise_errors)

    def send(self, commands: Sequence[Args], *, ahead: bytes = b"") -> None:
        """Send `commands` in one write, after `ahead` (commands encoded already, in the same write);
        `read` the replies of all of them, in that order, before anything else is sent."""
        if self._conn is None:
            self._conn = self._pool.get_connection()
            # Its health is checked by reading its replies, which redis-py no longer sees: left on, its check
            # would PING before every send once the interval passed.
            self._conn.health_check_interval = 0
        try:
            self._conn.send_packed_command([b"".join([ahead, *[resp.pack(args) for args in commands]])])
        except BaseException:
            self._conn.disconnect()
            raise

    def read(self, count: int, *, raise_errors: bool = True) -> list[Any]:
        """The replies of the `count` commands sent last; raises the first error reply, once all are read,
        or with `raise_errors` false leaves it in its place."""
        try:
            if isinstance(self._conn._sock, socket.socket):
                replies = [self._reply() for _ in range(count)]
            else:  # a connection with no socket of its own to read (fakeredis's) reads its replies itself
                replies = read_replies(self._conn, count)
        except BaseException:
            self._conn.disconnect()  # replies may be left unread: the connection is out of step
            raise
        for reply in replies:
            if raise_errors and isinstance(reply, redis.ResponseError):
                raise reply
        return replies

    def _reply(self) -> Any:
        """The next reply, an error reply as a redis.ResponseError in its place; raises redis.ConnectionError or
        redis.TimeoutError (after the client's socket timeout) as redis-py would."""
        sock = self._conn._sock
        if sock is not self._sock:
            encoder = self._conn.encoder
            encoding = (
                {"encoding": encoder.encoding, "errors": encoder.encoding_errors} if encoder.decode_responses else {}
            )
            self._sock = sock
            self._reader = hiredis.Reader(replyError=redis.ResponseError, notEnoughData=_MORE, **encoding)
        while (reply := self._reader.gets()) is _MORE:
            try:
                received = sock.recv_into(self._buffer)
            except TimeoutError as exc:
                raise redis.TimeoutError("Timeout reading from Redis") from exc
            except OSError as exc:
                raise redis.ConnectionError(f"Error while reading from Redis: {exc}") from exc
            if not received:
                raise redis.ConnectionError("Connection closed by server.")
            self._reader.feed(self._buffer, 0, received)
        return reply

    def interrupt(self) -> None:
        """Make a read that another thread is blocked in end now, as on a lost connection: for a thread that
        waits long for commands to stop without waiting out its block. The next `send` reconnects."""
        sock = getattr(self._conn, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile: nothing left to end
                sock.shutdown(socket.SHUT_RDWR)


def read_replies(connection: redis.Connection, count: int) -> list[Any]:
    """The next `count` replies on `connection`, a reply that is an error in its place as a redis.ResponseError."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(connection.read_response())
        except redis.ResponseError as exc:
            replies.append(exc)
    return replies
