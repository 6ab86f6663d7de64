"""A process of the test's own that holds a port, so kvbus meets a port another process listens on.

Run as `python -m tests.kvbus.port_holder [ARG...]`: it prints the port, then answers 200 to every
GET, so a readiness probe that reached it instead of kvbus's own process would pass. The ARGs only
land on its command line.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def port_held(*argv: str) -> Iterator[tuple[int, int]]:
    """(port, pid) of a loopback HTTP server in another process, with `argv` on its command line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kvbus.port_holder", *argv],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline()), proc.pid
    finally:
        proc.kill()
        proc.wait(10)


if __name__ == "__main__":
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    print(server.server_address[1], flush=True)
    server.serve_forever()
