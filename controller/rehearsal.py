"""A fresh controller serves a few requests to itself before its port does: its first real ones then run warm.

CPython specializes code as it runs it, and a process's first requests also grow its memory: a fresh
controller's first burst of 32 concurrent clears cost it 0.5-0.7 ms more CPU than its later bursts, and
took 110 page faults against 7. Calling the bus and the index directly warmed only them; the rest is
uvicorn's and Starlette's per-request code, which runs only for bytes that come through uvicorn's HTTP
protocol. So the rehearsal sends its requests through that protocol, over socket pairs, to a twin of
the app that shares its state but counts in a /metrics of its own: nothing reaches the real port, and
nothing the operator reads counts them. Sent over 32 connections at once, as a burst comes, they also grow
the memory a burst needs: the first burst then costs 0.1 ms more CPU than later ones, with 2 page faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence
from typing import cast

import uvicorn
from starlette.types import ASGIApp
from uvicorn.server import ServerState

TIMEOUT_S = 5.0  # the whole rehearsal: a few ms on an idle box; past this start-up goes on without it
_LENGTH = b"content-length:"


async def rehearse(app: ASGIApp, requests: Sequence[bytes], connections: int = 1) -> list[int]:
    """Send `requests` (whole HTTP/1.1 requests) to `app` through uvicorn's HTTP protocol, as uvicorn serves its
    port: over `connections` connections at once, each sending its share (every `connections`-th request) one
    after the other. Returns the statuses, connection by connection.

    Raises TimeoutError past TIMEOUT_S, and what reading an answer raises when a connection breaks."""
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
    config.load()
    serving = cast(Callable[..., asyncio.Protocol], config.http_protocol_class)
    state = ServerState()

    def protocol() -> asyncio.Protocol:
        return serving(config=config, server_state=state, app_state={})

    loop = asyncio.get_running_loop()
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        async with asyncio.timeout(TIMEOUT_S):
            for _ in range(connections):
                ours, theirs = socket.socketpair()
                await loop.connect_accepted_socket(protocol, ours)
                opened.append(await asyncio.open_connection(sock=theirs))
            shares = await asyncio.gather(
                *(_send(reader, writer, requests[n::connections]) for n, (reader, writer) in enumerate(opened))
            )
    finally:
        for _, writer in opened:
            writer.close()
        for _, writer in opened:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return [status for share in shares for status in share]


async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: Sequence[bytes]) -> list[int]:
    statuses = []
    for request in requests:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        statuses.append(int(head.split(b" ", 2)[1]))
        await reader.readexactly(_content_length(head))
    return statuses


def post(path: str, body: bytes, token: str | None) -> bytes:
    """The bytes of a POST of a JSON `body`, as an LMCache client sends it (with the API token when one is set)."""
    authorization = "" if token is None else f"Authorization: Bearer {token}\r\n"
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{authorization}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _content_length(head: bytes) -> int:
    for line in head.lower().split(b"\r\n"):
        if line.startswith(_LENGTH):
            return int(line[len(_LENGTH) :])
    return 0
