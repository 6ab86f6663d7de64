"""Chunks from one agent to another over TCP, for /move between instances.

The receiving agent listens on `p2p_host:p2p_init_ports[worker_id]`. A transfer is one
connection: an offer (hash space, destination location, each chunk's index entry), then
each chunk as a header (dtype, shape, size, SHA-256 checksum) and its raw bytes, bytes and
checksum as chunk_format.py makes them for the disk backend's files, then the receiver's reply. The
receiver stores nothing until every chunk has arrived and matched its checksum, and the
sender drops its copies only after that reply: a transfer cut midway, by either side dying,
leaves the source as it was and the destination without partial data.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Mapping, Sequence

import msgspec
import torch

from kvbus.agent import chunk_format
from kvbus.agent.backends.base import IndexEntry, StorageBackend
from kvbus.shared.hashing import HashSpace

log = logging.getLogger("kvbus.agent.peer")

_LENGTH = struct.Struct(">I")
_MAX_HEADER = 1 << 26  # an offer carries the token ids: up to max_lookup_tokens of them
_MAX_CHUNK = 1 << 34


class Offer(msgspec.Struct, frozen=True):
    space: str  # HashSpace.name: chunk keys mean the same only within one
    location: str
    entries: list[tuple[str, int, bool]]  # each chunk's key, token count and whether it starts a prompt


class ChunkHeader(msgspec.Struct, frozen=True):
    dtype: str
    shape: list[int]
    nbytes: int
    checksum: str


class Reply(msgspec.Struct, frozen=True):
    stored: list[str] = msgspec.field(default_factory=list)  # keys of the chunks the receiver now holds
    error: str = ""


class TransferFailed(Exception):
    pass


def send(
    peer_url: str,
    space: HashSpace,
    location: str,
    entries: Sequence[IndexEntry],
    tensors: Sequence[torch.Tensor],
    timeout_s: float,
) -> list[str]:
    """Hand these chunks to the agent at `peer_url`; returns the keys of those it now holds."""
    host, _, port = peer_url.rpartition(":")
    offer = Offer(space.name, location, [(entry.key, entry.num_tokens, entry.is_head) for entry in entries])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as conn:
            _send_frame(conn, msgspec.msgpack.encode(offer))
            for tensor in tensors:
                payload = chunk_format.payload_of(tensor)
                header = ChunkHeader(
                    chunk_format.dtype_name(tensor.dtype),
                    list(tensor.shape),
                    len(payload),
                    chunk_format.checksum(payload).hex(),
                )
                _send_frame(conn, msgspec.msgpack.encode(header))
                conn.sendall(payload)
            reply = msgspec.msgpack.decode(_recv_frame(conn), type=Reply)
    except (OSError, ValueError, msgspec.DecodeError) as exc:
        raise TransferFailed(f"transfer to {peer_url} failed: {type(exc).__name__}: {exc}") from exc
    if reply.error:
        raise TransferFailed(f"{peer_url} refused the chunks: {reply.error}")
    return reply.stored


class PeerServer:
    """Receives chunks for this worker's backends; one thread per connection."""

    def __init__(
        self,
        host: str,
        port: int,
        space: HashSpace,
        backends: Mapping[str, StorageBackend],
        after_store: Callable[[], None],
        timeout_s: float,
    ) -> None:
        receiver = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                receiver._serve(self.request)

        self.space = space
        self._backends = backends
        self._after_store = after_store
        self._timeout_s = timeout_s
        self._server = socketserver.ThreadingTCPServer((host, port), _Handler, bind_and_activate=False)
        self._server.daemon_threads = True
        self._server.allow_reuse_address = True
        self._server.server_bind()
        self._server.server_activate()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="kvbus-peer", daemon=True)
        self._thread.start()
        log.info("peer endpoint listening on %s:%d", *self.address)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self._timeout_s)
        try:
            reply = self._receive(conn)
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            log.warning("dropped an incoming transfer: %s", exc)
            return
        try:
            _send_frame(conn, msgspec.msgpack.encode(reply))
        except OSError as exc:
            log.warning("could not confirm a transfer (%s); the sender keeps its chunks", exc)

    def _receive(self, conn: socket.socket) -> Reply:
        offer = msgspec.msgpack.decode(_recv_frame(conn), type=Offer)
        tensors = []
        damaged = 0
        # Every chunk is read, even after a damaged one, so that the sender is never cut off mid-send.
        for _ in offer.entries:
            header = msgspec.msgpack.decode(_recv_frame(conn), type=ChunkHeader)
            if not 0 <= header.nbytes <= _MAX_CHUNK:
                raise ValueError(f"chunk of {header.nbytes} bytes")
            payload = _recv_exact(conn, header.nbytes)
            if chunk_format.checksum(payload).hex() != header.checksum:
                damaged += 1
            else:
                tensors.append(chunk_format.tensor_from(payload, header.dtype, header.shape))
        if damaged:
            return Reply(error=f"{damaged} chunks arrived damaged (checksum mismatch); nothing was stored")
        if offer.space != self.space.name:
            return Reply(error=f"chunks of {offer.space} cannot be stored by an agent of {self.space.name}")
        backend = self._backends.get(offer.location)
        if backend is None:
            return Reply(error=f"this worker has no {offer.location}")
        stored = backend.adopt([IndexEntry(*entry) for entry in offer.entries], tensors)
        self._after_store()  # index the chunks before the sender hears they arrived
        log.info("received %d chunks, kept %d, into %s", len(tensors), len(stored), offer.location)
        return Reply(stored=stored)


def _send_frame(conn: socket.socket, data: bytes) -> None:
    conn.sendall(_LENGTH.pack(len(data)) + data)


def _recv_frame(conn: socket.socket) -> bytearray:
    (length,) = _LENGTH.unpack(_recv_exact(conn, _LENGTH.size))
    if length > _MAX_HEADER:
        raise ValueError(f"frame of {length} bytes")
    return _recv_exact(conn, length)


def _recv_exact(conn: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        n = conn.recv_into(view[received:], min(size - received, 1 << 20))
        if n == 0:
            raise ConnectionError(f"peer closed the connection after {received} of {size} bytes")
        received += n
    return buffer
