"""A minimal asyncio HTTP/1.1 keep-alive client: the load generator of the HTTP benchmarks.

httpx costs ~1.4 ms of CPU per request on a 2-core box, more than the controller it measures, so
it can neither drive 2000 requests/s nor leave the controller its CPU. This client sends
pre-encoded request bytes over one connection and reads the answer back: the status line and
headers up to the blank line, then exactly Content-Length bytes of body (~30-60 us of CPU per
request). It speaks just enough HTTP for our controller: no chunked bodies, no redirects, no TLS.

Nothing is taken on trust: `Connection.send` returns the status and the raw body, and
`expect_json` raises unless the status is 200 and the body decodes; callers then check the JSON,
so that no figure can come from a stream of errors answered quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

_CONTENT_LENGTH = b"content-length:"


class HTTPError(RuntimeError):
    """A response that is not what the benchmark asked for (status, framing or body)."""


def encode_post(path: str, body: bytes | str | dict[str, Any] | list[Any], host: str = "x") -> bytes:
    """The full bytes of `POST path` with a JSON body: encode once, send many times."""
    if isinstance(body, dict | list):
        body = json.dumps(body, separators=(",", ":"))
    if isinstance(body, str):
        body = body.encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection; requests on it go one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, base_url: str) -> Connection:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"need http://HOST:PORT, not {base_url!r}")
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 24)
        return cls(reader, writer)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one pre-encoded request; return the response's status and body."""
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        # b"HTTP/1.1 200 OK\r\n..." -> 200
        if not head.startswith(b"HTTP/1.1 "):
            raise HTTPError(f"not an HTTP/1.1 response: {head[:80]!r}")
        status = int(head[9:12])
        length = -1
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == _CONTENT_LENGTH:
                length = int(line[15:])
                break
        if length < 0:
            raise HTTPError(f"response without Content-Length (status {status}): {head[:200]!r}")
        body = await self._reader.readexactly(length) if length else b""
        return status, body

    async def expect_json(self, request: bytes) -> Any:
        """Send `request`; return its JSON body, or raise unless the status is 200."""
        status, body = await self.send(request)
        return check_json(status, body)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


def check_json(status: int, body: bytes) -> Any:
    """The decoded body of a 200 answer; HTTPError for any other status or a body that is not JSON."""
    if status != 200:
        raise HTTPError(f"HTTP {status}: {body[:300]!r}")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise HTTPError(f"200 with a body that is not JSON: {body[:300]!r}") from exc


async def connections(base_url: str, count: int) -> list[Connection]:
    return list(await asyncio.gather(*(Connection.open(base_url) for _ in range(count))))


async def close_all(conns: list[Connection]) -> None:
    await asyncio.gather(*(conn.close() for conn in conns))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def runner() -> asyncio.Runner:
    """An event loop to run several steps on (a connection outlives each step): uvloop where it is
    installed, for less client CPU per request, else asyncio's own."""
    return asyncio.Runner(loop_factory=_loop_factory())


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on a fresh loop of `runner()`'s kind."""
    with runner() as loop:
        return loop.run(coro)
