"""kvbus.ports: sockets bound before a server says it is ready, and the holder named when a port is taken."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from kvbus.ports import PortError, check_free, holders, listen, listened_by
from tests.kvbus.port_holder import port_held

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="holders are found through /proc")


def test_a_taken_port_is_refused_naming_the_holders_pid_and_command() -> None:
    with port_held() as (port, pid), pytest.raises(PortError) as refused:
        listen("127.0.0.1", port, "HTTP port")
    assert str(refused.value) == (
        f"HTTP port 127.0.0.1:{port} is already in use by pid {pid} ({sys.executable} -m tests.kvbus.port_holder)"
    )


def test_the_holders_command_line_is_shown_without_passwords() -> None:
    with port_held("--redis-url=redis://:s3cret@cache:6379/0") as (port, pid):
        assert holders(port) == [
            f"pid {pid} ({sys.executable} -m tests.kvbus.port_holder --redis-url=redis://***@cache:6379/0)"
        ]


def test_a_free_port_is_listened_on_by_this_process_only() -> None:
    with port_held() as (_, other):
        sockets = listen("127.0.0.1", 0)
        port = sockets[0].getsockname()[1]
        try:
            assert listened_by(os.getpid(), port) is True
            assert listened_by(other, port) is False
            (holder,) = holders(port)
            assert holder.startswith(f"pid {os.getpid()} (")
            # Already listening: a client connects (and waits in the backlog) before any event loop runs.
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
        finally:
            for sock in sockets:
                sock.close()
    assert holders(port) == ["another process"]
    check_free("127.0.0.1", port)  # closed sockets leave nothing behind


def test_an_address_this_machine_lacks_is_refused_with_the_reason() -> None:
    with pytest.raises(PortError, match=r"cannot listen on 192\.0\.2\.1:\d+: Cannot assign requested address"):
        listen("192.0.2.1", 0)
