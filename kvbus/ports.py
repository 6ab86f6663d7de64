"""Listening sockets for kvbus's servers, and the process that holds a port when one is taken.

A server binds its port before it says it is listening or ready, so a taken port stops it with
one line instead of after a "ready". The holder is found through /proc (Linux); where /proc does
not show it (another user's process, another OS) the line says "another process".
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from kvbus.shared.redis_conn import redacted

_PROC = Path("/proc")
_TCP_TABLES = ("net/tcp", "net/tcp6")
_LISTEN = "0A"  # the st column of /proc/net/tcp for a socket in LISTEN
_COMMAND_CHARS = 160


class PortError(Exception):
    """A port this process cannot listen on; the message is one line for the operator, holder included."""


def where(host: str | None, port: int) -> str:
    if not host:
        return f"*:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(host: str | None, port: int, what: str = "") -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to (all of them for None or ""), as uvicorn would bind.

    Bound the way asyncio's create_server binds for uvicorn (SO_REUSEADDR, IPv6 sockets v6-only),
    so handing these to uvicorn serves exactly what `uvicorn.run(host=, port=)` would have. `what`
    (say "HTTP port") leads the address in the error.
    """
    subject = f"{what} {where(host, port)}" if what else where(host, port)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortError(f"cannot listen on {subject}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            # Listening now, not when the event loop starts: what connects meanwhile waits in the
            # backlog instead of being refused, and the socket shows as this process's in /proc.
            sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortError(f"{subject} is already in use by {' and '.join(holders(port))}") from None
        raise PortError(f"cannot listen on {subject}: {exc.strerror or exc}") from None
    return sockets


def check_free(host: str | None, port: int, what: str = "") -> None:
    """Raise PortError naming the holder if `port` cannot be listened on at `host`; hold nothing."""
    for sock in listen(host, port, what):
        sock.close()


def holders(port: int) -> list[str]:
    """The processes listening on `port`, as "pid N (command line)"; ["another process"] when /proc hides them."""
    inodes = _listening(port)
    found: list[str] = []
    if inodes:
        for entry in _PROC.iterdir():
            if entry.name.isdigit() and inodes & (_sockets_of(int(entry.name)) or set()):
                found.append(_describe(int(entry.name)))
    return found or ["another process"]


def listened_by(pid: int, port: int) -> bool | None:
    """Whether process `pid` listens on `port`; None where /proc cannot tell."""
    inodes = _listening(port)
    held = _sockets_of(pid)
    if inodes is None or held is None:
        return None
    return bool(inodes & held)


def _listening(port: int) -> set[str] | None:
    """The fd link targets ("socket:[inode]") of the sockets listening on `port`; None without /proc."""
    found: set[str] = set()
    readable = False
    for table in _TCP_TABLES:
        try:
            lines = (_PROC / table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            fields = line.split()
            if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(f"socket:[{fields[9]}]")
    return found if readable else None


def _sockets_of(pid: int) -> set[str] | None:
    try:
        fds = list((_PROC / str(pid) / "fd").iterdir())
    except OSError:
        return None  # gone, or another user's
    links: set[str] = set()
    for fd in fds:
        try:
            links.add(os.readlink(fd))
        except OSError:
            continue  # closed since the listing
    return links


def _describe(pid: int) -> str:
    try:
        argv = (_PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}"
    # Another process's command line may carry a Redis password; this line goes to logs.
    command = " ".join(redacted(arg) if "://" in arg else arg for arg in argv if arg)
    if len(command) > _COMMAND_CHARS:
        command = command[: _COMMAND_CHARS - 1] + "…"
    return f"pid {pid} ({command})" if command else f"pid {pid}"
