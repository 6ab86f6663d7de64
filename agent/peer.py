"""Chunks from one agent to another over TCP, for /move between instances.

The receiving agent listens on `p2p_host:p2p_init_ports[worker_id]` and takes chunks only with a ticket:
proof that a controller asked for the transfer (controller/tickets.py), without which anyone who reached
the port could put KV of their choosing into this instance and have lookups send prompts to it.

A transfer is one connection, in three steps, the receiver answering each before the sender goes on:
1. The ticket's token. The receiver redeems it, reading and deleting its Redis record in one step, so a
   ticket serves once. A sender without a valid one is refused and logged before anything else is read.
2. The offer: hash space, destination location, each chunk's index entry. It must fit the ticket (the
   location, the tokens it names) and this worker (the space, the location).
3. Each chunk as a header (dtype, shape, size, SHA-256 checksum) and its raw bytes, bytes and checksum
   as chunk_format.py makes them for the disk backend's files; the receiver answers with what it stored.
The receiver stores nothing until every chunk has arrived and matched its checksum, and the sender drops
its copies only after that answer: a transfer cut midway, by either side dying, leaves the source as it
was and the destination without partial data.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Mapping, Sequence

import msgspec
import redis
import torch

from kvbus.agent import chunk_format
from kvbus.agent.backends.base import IndexEntry, StorageBackend
from kvbus.shared import keys
from kvbus.shared.hashing import HashSpace
from kvbus.shared.messages import TICKET_BYTES
from kvbus.shared.records import MoveTicket

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
    offer = Offer(space.name, location, [(entry.key, entry.num_tokens, entry.is_head) for entry in entries])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as conn:
            conn.sendall(token)
            _go_ahead(conn, peer_url)
            _send_frame(conn, msgspec.msgpack.encode(offer))
            _go_ahead(conn, peer_url)
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


class PeerServer:
    """Receives chunks for this worker's backends, from senders with a ticket; one thread per connection."""

    def __init__(
        self,
        host: str,
        port: int,
        space: HashSpace,
        backends: Mapping[str, StorageBackend],
        after_store: Callable[[], None],
        timeout_s: float,
        *,
        tickets: redis.Redis,
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

    def _serve(self, conn: socket.socket, sender: tuple[str, int]) -> None:
        conn.settimeout(self._timeout_s)
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
        ticket = self._redeem(bytes(_recv_exact(conn, TICKET_BYTES)))
        if ticket is None:
            return _refused(sender, "it shows no valid ticket (none was issued, or it was used or has expired)")
        _send_frame(conn, _GO_AHEAD)
        offer = msgspec.msgpack.decode(_recv_frame(conn), type=Offer)
        refusal = self._refusal(ticket, offer)
        if refusal:
            return _refused(f"{sender} ({ticket.source_instance} worker {ticket.source_worker})", refusal)
        _send_frame(conn, _GO_AHEAD)
        tensors, damaged = self._read_chunks(conn, offer)
        if damaged:
            return Reply(error=f"{damaged} chunks arrived damaged (checksum mismatch); nothing was stored")
        stored = self._backends[offer.location].adopt([IndexEntry(*entry) for entry in offer.entries], tensors)
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

    def _refusal(self, ticket: MoveTicket, offer: Offer) -> str:
        """Why this worker cannot take `offer` under `ticket`; empty if it can."""
        if (ticket.worker_id, ticket.location) != (self._worker, offer.location):
            return (
                f"the ticket is for {ticket.location} of worker {ticket.worker_id}, "
                f"not {offer.location} of worker {self._worker}"
            )
        if offer.space != self.space.name:
            return f"chunks of {offer.space} cannot be stored by an agent of {self.space.name}"
        if offer.location not in self._backends:
            return f"this worker has no {offer.location}"
        offered = sum(num_tokens for _, num_tokens, _ in offer.entries)
        if ticket.max_tokens and offered > ticket.max_tokens:
            return f"{offered} tokens offered where the ticket allows {ticket.max_tokens}"
        return ""

    def _read_chunks(self, conn: socket.socket, offer: Offer) -> tuple[list[torch.Tensor], int]:
        """The offered chunks that arrived intact, and how many arrived damaged."""
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
        return tensors, damaged

    def _redeem(self, token: bytes) -> MoveTicket | None:
        """The ticket `token` is the token of, deleted as it is read, so that it serves one transfer only."""
        key = keys.ticket(self._instance, token)
        pipe = self._tickets.pipeline(transaction=True)
        pipe.hgetall(key)
        pipe.delete(key)
        fields, _ = pipe.execute()
        return MoveTicket.decode(fields) if fields else None


_GO_AHEAD = msgspec.msgpack.encode(Reply())


def _refused(sender: str, reason: str) -> Reply:
    log.warning("refused a transfer from %s: %s", sender, reason)
    return Reply(error=reason)


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
