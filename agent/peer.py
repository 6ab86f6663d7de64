"""Chunks from one agent to another over TCP, for /move between instances.

The receiving agent listens on `p2p_host:p2p_init_ports[worker_id]`, that host and no wider, and takes
chunks only with a ticket: proof that a controller asked for the transfer (controller/tickets.py), without
which anyone who reached the port could put KV of their choosing into this instance and have lookups send
prompts to it.

A transfer is one connection, in three steps, the receiver answering each before the sender goes on:
1. The ticket's token. The receiver redeems it, reading and deleting its Redis record in one step, so a
   ticket serves once. A sender without a valid one is refused and logged before anything else is read.
2. The offer: hash space, destination location, and each chunk's index entry and geometry (dtype and
   shape, hence its size). It must fit the ticket (rank, location, the tokens it names) and this worker
   (the space, chunks of at most chunk_size tokens, bytes the location can hold) before any chunk data
   is read.
3. Each chunk's raw bytes, as chunk_format.py makes them for the disk backend's files, then their SHA-256
   digest; the receiver answers with what it stored.
The receiver stores nothing until every chunk has arrived and matched its digest, and the sender drops
its copies only after that answer: a transfer cut midway, by either side dying, leaves the source as it
was and the destination without partial data.

What one sender can cost a receiver is bounded: at most `_MAX_TRANSFERS` connections are served at once
(more are closed as they arrive), steps 1 and 2 must arrive within `timeout_s` together, and bytes are
read in pieces as they arrive, so a size declared and never sent commits no memory.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import redis
import torch

from kvbus.agent import chunk_format
from kvbus.agent.backends.base import IndexEntry, StorageBackend
from kvbus.shared import keys, redis_conn
from kvbus.shared.hashing import HashSpace
from kvbus.shared.messages import TICKET_BYTES
from kvbus.shared.records import MoveTicket

log = logging.getLogger("kvbus.agent.peer")

_LENGTH = struct.Struct(">I")
_MAX_FRAME = 1 << 26  # an offer names each chunk: up to max_lookup_tokens (one token each) of them
_PIECE = 1 << 20  # the most one read takes from the socket
# Transfers served at once by one worker. A move sends one per source rank, and moves from one instance
# run one after another, so this leaves room for several instances moving here at once.
_MAX_TRANSFERS = 8


class OfferedChunk(msgspec.Struct, frozen=True, array_like=True):
    key: str
    num_tokens: int
    is_head: bool  # whether it starts a prompt
    dtype: str  # chunk_format's names
    shape: list[int]


class Offer(msgspec.Struct, frozen=True):
    space: str  # HashSpace.name: chunk keys mean the same only within one
    location: str
    chunks: list[OfferedChunk]


class Reply(msgspec.Struct, frozen=True):
    """The receiver's answer to each step: an error ends the transfer; after the chunks, what it stored."""

    stored: list[str] = msgspec.field(default_factory=list)  # keys of the chunks the receiver now holds
    error: str = ""


class TransferFailed(Exception):
    pass


def send(
    peer_url: str,
    ticket: str,
    space: HashSpace,
    location: str,
    entries: Sequence[IndexEntry],
    tensors: Sequence[torch.Tensor],
    timeout_s: float,
) -> list[str]:
    """Hand these chunks to the agent at `peer_url`, showing it `ticket` (the token, in hex, the command
    carries); returns the keys of those it now holds."""
    token = _token(ticket)
    if token is None:
        raise TransferFailed(f"the command carries no ticket for {peer_url}, which takes chunks only with one")
    host, _, port = peer_url.rpartition(":")
    offer = Offer(
        space.name,
        location,
        [
            OfferedChunk(e.key, e.num_tokens, e.is_head, chunk_format.dtype_name(t.dtype), list(t.shape))
            for e, t in zip(entries, tensors, strict=True)
        ],
    )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as conn:
            conn.sendall(token)
            _go_ahead(conn, peer_url)
            _send_frame(conn, msgspec.msgpack.encode(offer))
            _go_ahead(conn, peer_url)
            for tensor in tensors:
                payload = chunk_format.payload_of(tensor)
                conn.sendall(payload)
                conn.sendall(chunk_format.checksum(payload))
            return _go_ahead(conn, peer_url).stored
    except (OSError, ValueError, msgspec.DecodeError) as exc:
        raise TransferFailed(f"transfer to {peer_url} failed: {type(exc).__name__}: {exc}") from exc


def _token(ticket: str) -> bytes | None:
    try:
        token = bytes.fromhex(ticket)
    except ValueError:
        return None
    return token if len(token) == TICKET_BYTES else None


def _go_ahead(conn: socket.socket, peer_url: str) -> Reply:
    """The receiver's answer to the step just sent; TransferFailed if it refused."""
    reply = msgspec.msgpack.decode(_recv_frame(conn), type=Reply)
    if reply.error:
        raise TransferFailed(f"{peer_url} refused the chunks: {reply.error}")
    return reply


class _Server(socketserver.ThreadingTCPServer):
    """A thread per connection, at most `max_connections` at once: one more is closed as it arrives."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's 5 is too short a listen queue for a burst of connections (every rank of a move, or
    # a stranger's flood): the kernel drops the SYNs past it and their senders wait a second to retry.
    request_queue_size = 64

    def __init__(
        self, address: tuple[str, int], handler: type[socketserver.BaseRequestHandler], max_connections: int
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        super().__init__(address, handler)

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning(
                "closed a peer connection from %s:%d: %d transfers are in progress already",
                *client_address[:2],
                self._max_connections,
            )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()  # its thread never started, so nothing else gives the slot back
            raise

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class PeerServer:
    """Receives chunks for this worker's backends, from senders with a ticket."""

    def __init__(
        self,
        host: str,
        port: int,
        space: HashSpace,
        backends: Mapping[str, StorageBackend],
        after_store: Callable[[], None],
        timeout_s: float,
        *,
        tickets: redis_conn.Client,
        instance_id: str,
        worker_id: int,
    ) -> None:
        receiver = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                receiver._serve(self.request, self.client_address)

        self.space = space
        self._backends = backends
        self._after_store = after_store
        self._timeout_s = timeout_s
        self._tickets = tickets
        self._instance = instance_id
        self._worker = worker_id
        self._server = _Server((host, port), _Handler, _MAX_TRANSFERS)
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

    def _serve(self, conn: socket.socket, sender: tuple[str, int]) -> None:
        try:
            reply = self._receive(conn, f"{sender[0]}:{sender[1]}")
        except (OSError, ValueError, msgspec.DecodeError, redis.RedisError) as exc:
            log.warning("dropped an incoming transfer from %s:%d: %s", *sender[:2], exc)
            return
        try:
            _send_frame(conn, msgspec.msgpack.encode(reply))
        except OSError as exc:
            log.warning("could not confirm a transfer (%s); the sender keeps its chunks", exc)

    def _receive(self, conn: socket.socket, sender: str) -> Reply:
        # The ticket and the offer come at once from a real sender: a connection that trickles them
        # would hold one of the few slots for as long as it liked.
        deadline = time.monotonic() + self._timeout_s
        ticket = self._redeem(_recv_exact(conn, TICKET_BYTES, deadline))
        if ticket is None:
            return _refused(sender, "it shows no valid ticket (none was issued, or it was used or has expired)")
        _send_frame(conn, _GO_AHEAD)
        offer = msgspec.msgpack.decode(_recv_frame(conn, deadline), type=Offer)
        refusal = self._against_ticket(ticket, offer) or self._against_worker(offer)
        if refusal:
            return _refused(f"{sender} ({ticket.source_instance} worker {ticket.source_worker})", refusal)
        _send_frame(conn, _GO_AHEAD)
        conn.settimeout(self._timeout_s)  # chunk data may take longer in all, but never stalls that long
        tensors, damaged = _read_chunks(conn, offer)
        if damaged:
            return Reply(error=f"{damaged} chunks arrived damaged (checksum mismatch); nothing was stored")
        stored = self._backends[offer.location].adopt(
            [IndexEntry(c.key, c.num_tokens, c.is_head) for c in offer.chunks], tensors
        )
        self._after_store()  # index the chunks before the sender hears they arrived
        log.info(
            "received %d chunks from %s worker %d, kept %d, into %s",
            len(tensors),
            ticket.source_instance,
            ticket.source_worker,
            len(stored),
            offer.location,
        )
        return Reply(stored=stored)

    def _redeem(self, token: bytes) -> MoveTicket | None:
        """The ticket `token` is the token of, deleted as it is read, so that it serves one transfer only."""
        key = keys.ticket(self._instance, token)
        pipe = self._tickets.pipeline(transaction=True)
        pipe.hgetall(key)
        pipe.delete(key)
        fields, _ = pipe.execute()
        return MoveTicket.decode(fields) if fields else None

    def _against_ticket(self, ticket: MoveTicket, offer: Offer) -> str:
        """Why the ticket does not cover `offer`; empty if it does."""
        if (ticket.worker_id, ticket.location) != (self._worker, offer.location):
            return (
                f"the ticket is for {ticket.location} of worker {ticket.worker_id}, "
                f"not {offer.location} of worker {self._worker}"
            )
        offered = sum(chunk.num_tokens for chunk in offer.chunks)
        if ticket.max_tokens and offered > ticket.max_tokens:
            return f"{offered} tokens offered where the ticket allows {ticket.max_tokens}"
        return ""

    def _against_worker(self, offer: Offer) -> str:
        """Why this worker cannot hold `offer`; empty if it can."""
        if offer.space != self.space.name:
            return f"chunks of {offer.space} cannot be stored by an agent of {self.space.name}"
        backend = self._backends.get(offer.location)
        if backend is None:
            return f"this worker has no {offer.location}"
        if any(not 1 <= chunk.num_tokens <= self.space.chunk_size for chunk in offer.chunks):
            return f"a chunk here holds 1 to {self.space.chunk_size} tokens"
        try:
            size = sum(chunk_format.payload_bytes(chunk.dtype, chunk.shape) for chunk in offer.chunks)
        except chunk_format.ChunkFormatError as exc:
            return f"a chunk's dtype or shape is impossible: {exc}"
        if size > backend.capacity_bytes:
            return f"{size} bytes of chunks offered where {offer.location} holds {backend.capacity_bytes}"
        return ""


_GO_AHEAD = msgspec.msgpack.encode(Reply())


def _refused(sender: str, reason: str) -> Reply:
    log.warning("refused a transfer from %s: %s", sender, reason)
    return Reply(error=reason)


def _read_chunks(conn: socket.socket, offer: Offer) -> tuple[list[torch.Tensor], int]:
    """The offered chunks that arrived intact, and how many arrived damaged."""
    tensors = []
    damaged = 0
    # Every chunk is read, even after a damaged one, so that the sender is never cut off mid-send.
    for chunk in offer.chunks:
        # torch.empty writes nothing, so the pages of a size the offer declared are committed only as
        # the bytes arrive; what they may add up to was checked against the location's capacity.
        payload = torch.empty(chunk_format.payload_bytes(chunk.dtype, chunk.shape), dtype=torch.uint8)
        view = payload.numpy().data
        _recv_into(conn, view)
        if chunk_format.checksum(view) != _recv_exact(conn, chunk_format.DIGEST_BYTES):
            damaged += 1
        else:
            tensors.append(chunk_format.tensor_from(payload, chunk.dtype, chunk.shape))
    return tensors, damaged


def _send_frame(conn: socket.socket, data: bytes) -> None:
    conn.sendall(_LENGTH.pack(len(data)) + data)


def _recv_frame(conn: socket.socket, deadline: float | None = None) -> bytes:
    (length,) = _LENGTH.unpack(_recv_exact(conn, _LENGTH.size, deadline))
    if length > _MAX_FRAME:
        raise ValueError(f"frame of {length} bytes")
    return _recv_exact(conn, length, deadline)


def _recv_exact(conn: socket.socket, size: int, deadline: float | None = None) -> bytes:
    """`size` bytes, read as they arrive: a length a sender declares costs memory only as it sends the bytes.
    With a `deadline` (time.monotonic()), all of them must have arrived by then."""
    pieces = []
    received = 0
    while received < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{received} of {size} bytes arrived in time")
            conn.settimeout(left)
        piece = conn.recv(min(size - received, _PIECE))
        if not piece:
            raise ConnectionError(f"peer closed the connection after {received} of {size} bytes")
        pieces.append(piece)
        received += len(piece)
    return b"".join(pieces)


def _recv_into(conn: socket.socket, view: memoryview) -> None:
    """Fill `view` from `conn`, a piece at a time."""
    received = 0
    while received < len(view):
        n = conn.recv_into(view[received:], min(len(view) - received, _PIECE))
        if n == 0:
            raise ConnectionError(f"peer closed the connection after {received} of {len(view)} bytes")
        received += n
