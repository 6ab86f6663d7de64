"""Chunk transfer between agents: exact bytes, checksums, a source that keeps its chunks when a transfer does
not complete, and a receiver that takes chunks only under a ticket a controller wrote."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import fakeredis.aioredis
import msgspec
import pytest
import torch

from kvbus.agent import chunk_format, peer
from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.handlers import CommandHandlers
from kvbus.agent.synthetic import synthetic_kv
from kvbus.controller.tickets import issue_tickets
from kvbus.shared import keys
from kvbus.shared.hashing import HashSpace
from kvbus.shared.messages import TICKET_BYTES, Command, CommandKind, ResultStatus
from kvbus.shared.records import MoveTicket
from tests.conftest import MODEL

SPACE = HashSpace(MODEL, 256)
PROMPT = list(range(500, 1100))  # chunks of 256, 256 and 88
CPU = "LocalCPUBackend"
INSTANCE = "dst"


@dataclass
class Receiver:
    server: peer.PeerServer
    backend: LocalCPUBackend
    flushes: list[int]
    redis: fakeredis.FakeServer

    @property
    def url(self) -> str:
        host, port = self.server.address
        return f"{host}:{port}"

    def ticket(self, *, location: str = CPU, worker_id: int = 0, max_tokens: int = 0, instance: str = INSTANCE) -> str:
        """A ticket as the controller writes it for a /move into `instance`."""
        grant = MoveTicket(
            source_instance="src", source_worker=0, worker_id=worker_id, location=location, max_tokens=max_tokens
        )
        client = fakeredis.aioredis.FakeRedis(server=self.redis)
        return asyncio.run(issue_tickets(client, instance, {"0": grant}, ttl_ms=5000))["0"]

    def send(self, ticket: str, space: HashSpace = SPACE, location: str = CPU, tokens: list[int] = PROMPT) -> list[str]:
        return peer.send(self.url, ticket, space, location, entries(space, tokens), synthetic_kv(space, tokens), 5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    backend = LocalCPUBackend(SPACE, 1 << 30)
    flushes: list[int] = []
    redis = fakeredis.FakeServer()
    server = peer.PeerServer(
        "127.0.0.1",
        0,
        SPACE,
        {CPU: backend},
        after_store=lambda: flushes.append(1),
        timeout_s=5,
        tickets=fakeredis.FakeRedis(server=redis, decode_responses=True),
        instance_id=INSTANCE,
        worker_id=0,
    )
    server.start()
    yield Receiver(server, backend, flushes, redis)
    server.stop()


def entries(space: HashSpace, tokens: list[int]) -> list[IndexEntry]:
    return [IndexEntry(c.key, c.num_tokens, c.start == 0) for c in space.chunks(tokens)]


def test_chunks_arrive_bit_exact_in_any_dtype(receiver: Receiver) -> None:
    tensors = [t.to(torch.bfloat16) for t in synthetic_kv(SPACE, PROMPT)]
    sent = entries(SPACE, PROMPT)
    assert peer.send(receiver.url, receiver.ticket(), SPACE, CPU, sent, tensors, 5) == [e.key for e in sent]
    assert receiver.flushes == [1]  # indexed before the sender heard back
    for sent_tensor, kept in zip(tensors, receiver.backend.retrieve(PROMPT), strict=True):
        assert kept.dtype == torch.bfloat16 and torch.equal(sent_tensor, kept)


def test_a_receiver_of_another_model_or_location_refuses(receiver: Receiver) -> None:
    other = HashSpace("Qwen/Qwen3-8B", 256)
    with pytest.raises(peer.TransferFailed, match="cannot be stored by an agent of"):
        receiver.send(receiver.ticket(), other)
    with pytest.raises(peer.TransferFailed, match="has no LocalDiskBackend"):
        receiver.send(receiver.ticket(location="LocalDiskBackend"), location="LocalDiskBackend")
    assert len(receiver.backend) == 0


def test_a_strangers_transfer_is_refused_and_logged_before_its_offer_is_read(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    forged = secrets.token_hex(TICKET_BYTES)
    with caplog.at_level(logging.WARNING, logger="kvbus.agent.peer"):
        with pytest.raises(peer.TransferFailed, match="no valid ticket"):
            receiver.send(forged)
        # Without any ticket, the sender does not even connect.
        with pytest.raises(peer.TransferFailed, match="carries no ticket"):
            receiver.send("")
    assert len(receiver.backend) == 0 and receiver.flushes == []
    assert any("refused a transfer from 127.0.0.1:" in m and "no valid ticket" in m for m in caplog.messages)


def test_a_ticket_serves_one_transfer(receiver: Receiver) -> None:
    ticket = receiver.ticket()
    assert len(receiver.send(ticket, tokens=PROMPT[:256])) == 1
    with pytest.raises(peer.TransferFailed, match="no valid ticket"):
        receiver.send(ticket)  # replayed
    assert receiver.backend.contains(PROMPT) == 256


def test_a_ticket_refused_for_its_offer_is_spent_all_the_same(receiver: Receiver) -> None:
    ticket = receiver.ticket(location="LocalDiskBackend")
    with pytest.raises(
        peer.TransferFailed, match="the ticket is for LocalDiskBackend of worker 0, not LocalCPUBackend"
    ):
        receiver.send(ticket)
    with pytest.raises(peer.TransferFailed, match="no valid ticket"):
        receiver.send(ticket, location="LocalDiskBackend")
    assert len(receiver.backend) == 0


@pytest.mark.parametrize(
    ("grant", "reason"),
    [
        ({"location": "LocalDiskBackend"}, "the ticket is for LocalDiskBackend of worker 0, not LocalCPUBackend"),
        ({"worker_id": 1}, "the ticket is for LocalCPUBackend of worker 1, not LocalCPUBackend of worker 0"),
        ({"instance": "other"}, "no valid ticket"),
        ({"max_tokens": 512}, "600 tokens offered where the ticket allows 512"),
    ],
)
def test_a_ticket_lets_in_only_what_the_controller_asked_for(
    receiver: Receiver, grant: dict[str, Any], reason: str
) -> None:
    with pytest.raises(peer.TransferFailed, match=reason):
        receiver.send(receiver.ticket(**grant))
    assert len(receiver.backend) == 0


def test_a_ticket_expires_with_the_commands_deadline(receiver: Receiver) -> None:
    ticket = receiver.ticket()
    key = keys.ticket(INSTANCE, bytes.fromhex(ticket))
    assert 0 < fakeredis.FakeRedis(server=receiver.redis).pttl(key) <= 5000


def test_a_damaged_chunk_stores_nothing(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    real = chunk_format.checksum
    sent: list[int] = []

    def corrupt_second(*parts: bytes | bytearray | memoryview) -> bytes:
        sent.append(1)
        return bytes(32) if len(sent) == 2 else real(*parts)

    monkeypatch.setattr(chunk_format, "checksum", corrupt_second)
    with pytest.raises(peer.TransferFailed, match="checksum mismatch"):
        receiver.send(receiver.ticket())
    assert len(receiver.backend) == 0


def move_command(port: int, tickets: dict[str, str]) -> Command:
    return Command(
        event_id="Move1",
        kind=CommandKind.MOVE,
        reply_to="r",
        timeout_ms=5000,
        location=CPU,
        tokens=PROMPT,
        dest_location=CPU,
        peers={"0": f"127.0.0.1:{port}"},
        tickets=tickets,
    )


def test_a_destination_that_dies_midway_leaves_the_source_intact() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def die_after_the_ticket() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()

    threading.Thread(target=die_after_the_ticket, daemon=True).start()
    source = LocalCPUBackend(SPACE, 1 << 30)
    source.store(PROMPT, synthetic_kv(SPACE, PROMPT))
    handlers = CommandHandlers({CPU: source}, "src", 0, space=SPACE, transfer_timeout_s=2)
    result = handlers(move_command(port, {"0": secrets.token_hex(TICKET_BYTES)}))
    listener.close()
    assert result.status == ResultStatus.ERROR and "the source keeps its chunks" in result.detail
    assert source.contains(PROMPT) == 600


def test_a_move_command_without_a_ticket_keeps_the_source(receiver: Receiver) -> None:
    source = LocalCPUBackend(SPACE, 1 << 30)
    source.store(PROMPT, synthetic_kv(SPACE, PROMPT))
    handlers = CommandHandlers({CPU: source}, "src", 0, space=SPACE, transfer_timeout_s=2)
    result = handlers(move_command(receiver.server.address[1], {}))
    assert result.status == ResultStatus.ERROR and "carries no ticket" in result.detail
    assert source.contains(PROMPT) == 600 and len(receiver.backend) == 0
    moved = handlers(move_command(receiver.server.address[1], {"0": receiver.ticket()}))
    assert moved.status == ResultStatus.OK and moved.num_tokens == 600 and receiver.backend.contains(PROMPT) == 600


def rss_bytes() -> int:
    """This process's resident memory, where the receiver's threads run."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def connect(server: peer.PeerServer) -> socket.socket:
    conn = socket.create_connection(server.address, timeout=5)
    conn.settimeout(5)
    return conn


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def answer(conn: socket.socket) -> peer.Reply:
    (length,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
    return msgspec.msgpack.decode(conn.recv(length, socket.MSG_WAITALL), type=peer.Reply)


GIB = 1 << 30
HUGE = peer.OfferedChunk(SPACE.chunks(PROMPT)[0].key, 256, True, "uint8", [2 * GIB])  # a 2 GiB chunk


def test_a_strangers_2_gib_header_allocates_nothing(receiver: Receiver) -> None:
    # The issue's message: an offer and a chunk header declaring 2 GiB, framed as transfers were before
    # tickets (about 200 bytes), that made the receiver allocate the declared size before any payload came.
    offer = msgspec.msgpack.encode({"space": SPACE.name, "location": CPU, "entries": [[HUGE.key, 256, True]]})
    header = msgspec.msgpack.encode({"dtype": "uint8", "shape": [2 * GIB], "nbytes": 2 * GIB, "checksum": "0" * 64})
    before = rss_bytes()
    with connect(receiver.server) as conn:
        conn.sendall(frame(offer) + frame(header))
        assert "no valid ticket" in answer(conn).error
    assert rss_bytes() - before < 50 << 20
    assert len(receiver.backend) == 0 and receiver.flushes == []


def test_an_offer_past_what_the_location_holds_is_refused_before_its_data(receiver: Receiver) -> None:
    with connect(receiver.server) as conn:
        conn.sendall(bytes.fromhex(receiver.ticket()))
        assert answer(conn) == peer.Reply()
        conn.sendall(frame(msgspec.msgpack.encode(peer.Offer(SPACE.name, CPU, [HUGE]))))
        assert answer(conn).error == f"{2 * GIB} bytes of chunks offered where {CPU} holds {GIB}"


def test_a_declared_size_costs_memory_only_as_its_bytes_arrive() -> None:
    backend = LocalCPUBackend(SPACE, 4 * GIB)  # room for the 2 GiB chunk: the offer is accepted
    redis = fakeredis.FakeServer()
    server = peer.PeerServer(
        "127.0.0.1",
        0,
        SPACE,
        {CPU: backend},
        after_store=lambda: None,
        timeout_s=5,
        tickets=fakeredis.FakeRedis(server=redis, decode_responses=True),
        instance_id=INSTANCE,
        worker_id=0,
    )
    server.start()
    try:
        ticket = Receiver(server, backend, [], redis).ticket()
        before = rss_bytes()
        with connect(server) as conn:
            conn.sendall(bytes.fromhex(ticket))
            assert answer(conn) == peer.Reply()
            conn.sendall(frame(msgspec.msgpack.encode(peer.Offer(SPACE.name, CPU, [HUGE]))))
            assert answer(conn) == peer.Reply()
            conn.sendall(bytes(1 << 20))  # 1 MiB of the 2 GiB, then the sender stalls
            time.sleep(0.3)
            grown = rss_bytes() - before
        assert grown < 50 << 20, f"RSS grew {grown / (1 << 20):.1f} MiB"
        assert len(backend) == 0
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("chunk", "reason"),
    [
        (peer.OfferedChunk("k", 257, True, "float32", [4]), "a chunk here holds 1 to 256 tokens"),
        (peer.OfferedChunk("k", 0, True, "float32", [4]), "a chunk here holds 1 to 256 tokens"),
        (peer.OfferedChunk("k", 1, True, "float32", [-4]), "impossible dimension -4"),
        (peer.OfferedChunk("k", 1, True, "float32", [1 << 40] * 3), "a shape of more than"),
        (peer.OfferedChunk("k", 1, True, "pickle", [4]), "unknown dtype 'pickle'"),
    ],
)
def test_an_offer_of_impossible_chunks_is_refused(receiver: Receiver, chunk: peer.OfferedChunk, reason: str) -> None:
    with connect(receiver.server) as conn:
        conn.sendall(bytes.fromhex(receiver.ticket()))
        assert answer(conn) == peer.Reply()
        conn.sendall(frame(msgspec.msgpack.encode(peer.Offer(SPACE.name, CPU, [chunk]))))
        assert reason in answer(conn).error


def test_connections_are_limited_and_time_out() -> None:
    server = peer.PeerServer(
        "127.0.0.1",
        0,
        SPACE,
        {},
        after_store=lambda: None,
        timeout_s=0.5,
        tickets=fakeredis.FakeRedis(decode_responses=True),
        instance_id=INSTANCE,
        worker_id=0,
    )
    server.start()
    try:
        assert server.address[0] == "127.0.0.1"  # where it was told to listen, and nowhere wider
        held = [connect(server) for _ in range(peer._MAX_TRANSFERS)]
        time.sleep(0.1)
        with connect(server) as extra:
            assert extra.recv(1) == b""  # closed at once: every slot is taken
        # A sender that trickles its ticket is cut off at the deadline all the same.
        held[0].sendall(b"x")
        time.sleep(0.3)
        held[0].sendall(b"x")
        started = time.monotonic()
        for conn in held:
            assert conn.recv(1) == b""
            conn.close()
        assert time.monotonic() - started < 0.5
        with connect(server) as again:  # the slots are free again
            again.sendall(bytes(TICKET_BYTES))
            assert "no valid ticket" in answer(again).error
    finally:
        server.stop()
