"""Chunk transfer between agents: exact bytes, checksums, and a source that keeps its chunks when a
transfer does not complete."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import torch

from kvbus.agent import chunk_format, peer
from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.handlers import CommandHandlers
from kvbus.agent.synthetic import synthetic_kv
from kvbus.shared.hashing import HashSpace
from kvbus.shared.messages import Command, CommandKind, ResultStatus
from tests.conftest import MODEL

SPACE = HashSpace(MODEL, 256)
PROMPT = list(range(500, 1100))  # chunks of 256, 256 and 88


@pytest.fixture
def receiver() -> Iterator[tuple[peer.PeerServer, LocalCPUBackend, list[int]]]:
    backend = LocalCPUBackend(SPACE, 1 << 30)
    flushes: list[int] = []
    server = peer.PeerServer(
        "127.0.0.1", 0, SPACE, {"LocalCPUBackend": backend}, after_store=lambda: flushes.append(1), timeout_s=5
    )
    server.start()
    yield server, backend, flushes
    server.stop()


def entries(space: HashSpace, tokens: list[int]) -> list[IndexEntry]:
    return [IndexEntry(c.key, c.num_tokens, c.start == 0) for c in space.chunks(tokens)]


def url(server: peer.PeerServer) -> str:
    host, port = server.address
    return f"{host}:{port}"


def test_chunks_arrive_bit_exact_in_any_dtype(receiver: tuple[peer.PeerServer, LocalCPUBackend, list[int]]) -> None:
    server, backend, flushes = receiver
    tensors = [t.to(torch.bfloat16) for t in synthetic_kv(SPACE, PROMPT)]
    sent = entries(SPACE, PROMPT)
    assert peer.send(url(server), SPACE, "LocalCPUBackend", sent, tensors, 5) == [e.key for e in sent]
    assert flushes == [1]  # indexed before the sender heard back
    for sent, kept in zip(tensors, backend.retrieve(PROMPT), strict=True):
        assert kept.dtype == torch.bfloat16 and torch.equal(sent, kept)


def test_a_receiver_of_another_model_or_location_refuses(
    receiver: tuple[peer.PeerServer, LocalCPUBackend, list[int]],
) -> None:
    server, backend, _ = receiver
    other = HashSpace("Qwen/Qwen3-8B", 256)
    with pytest.raises(peer.TransferFailed, match="cannot be stored by an agent of"):
        peer.send(url(server), other, "LocalCPUBackend", entries(other, PROMPT), synthetic_kv(other, PROMPT), 5)
    with pytest.raises(peer.TransferFailed, match="has no LocalDiskBackend"):
        peer.send(url(server), SPACE, "LocalDiskBackend", entries(SPACE, PROMPT), synthetic_kv(SPACE, PROMPT), 5)
    assert len(backend) == 0


def test_a_damaged_chunk_stores_nothing(
    receiver: tuple[peer.PeerServer, LocalCPUBackend, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, backend, _ = receiver
    real = chunk_format.checksum
    sent: list[int] = []

    def corrupt_second(*parts: bytes | bytearray | memoryview) -> bytes:
        sent.append(1)
        return bytes(32) if len(sent) == 2 else real(*parts)

    monkeypatch.setattr(chunk_format, "checksum", corrupt_second)
    with pytest.raises(peer.TransferFailed, match="checksum mismatch"):
        peer.send(url(server), SPACE, "LocalCPUBackend", entries(SPACE, PROMPT), synthetic_kv(SPACE, PROMPT), 5)
    assert len(backend) == 0


def test_a_destination_that_dies_midway_leaves_the_source_intact() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def die_after_the_offer() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()

    threading.Thread(target=die_after_the_offer, daemon=True).start()
    source = LocalCPUBackend(SPACE, 1 << 30)
    source.store(PROMPT, synthetic_kv(SPACE, PROMPT))
    handlers = CommandHandlers({"LocalCPUBackend": source}, "src", 0, space=SPACE, transfer_timeout_s=2)
    result = handlers(
        Command(
            event_id="Move1",
            kind=CommandKind.MOVE,
            reply_to="r",
            timeout_ms=5000,
            location="LocalCPUBackend",
            tokens=PROMPT,
            dest_location="LocalCPUBackend",
            peers={"0": f"127.0.0.1:{port}"},
        )
    )
    listener.close()
    assert result.status == ResultStatus.ERROR and "the source keeps its chunks" in result.detail
    assert source.contains(PROMPT) == 600
