"""The write-behind queue: bounded in bytes, dropping rather than blocking, and never landing a store after a clear."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from kvbus.agent.backends.disk import LocalDiskBackend
from kvbus.agent.write_behind import WriteBehind
from tests.agent.test_backends import CHUNK_BYTES, SPACE, kv
from tests.agent.test_disk import PROMPT, chunk_files


class BlockingDisk(LocalDiskBackend):
    """Its stores wait for `release`, as a slow disk would make them."""

    def __init__(self, directory: Path) -> None:
        super().__init__(SPACE, directory, 1 << 20)
        self.release = threading.Event()
        self.entered = threading.Event()

    def store(self, tokens: Sequence[int], kv: Sequence[torch.Tensor], *, epoch: int | None = None) -> int:
        self.entered.set()
        assert self.release.wait(30)
        return super().store(tokens, kv, epoch=epoch)


@pytest.fixture
def slow_writer(tmp_path: Path) -> Iterator[WriteBehind]:
    writer = WriteBehind(BlockingDisk(tmp_path), max_pending_bytes=3 * 3 * CHUNK_BYTES)  # three 12-token prompts
    writer.start()
    yield writer
    writer.backend.release.set()  # type: ignore[attr-defined]
    writer.stop()


def test_a_full_write_behind_queue_drops_the_disk_copy_instead_of_blocking(slow_writer: WriteBehind) -> None:
    disk: BlockingDisk = slow_writer.backend  # type: ignore[assignment]
    prompts = [[n * 100 + i for i in range(12)] for n in range(4)]
    assert slow_writer.submit(prompts[0], kv(prompts[0]))
    assert disk.entered.wait(10)  # the store in hand still counts: two more fit
    started = time.monotonic()
    outcomes = [slow_writer.submit(p, kv(p)) for p in prompts[1:]]
    assert time.monotonic() - started < 1.0
    assert outcomes == [True, True, False] and slow_writer.dropped == 1
    disk.release.set()
    assert slow_writer.drain(10)
    assert [disk.contains(p) for p in prompts] == [12, 12, 12, 0]


def test_a_clear_drops_stores_still_queued(slow_writer: WriteBehind) -> None:
    disk: BlockingDisk = slow_writer.backend  # type: ignore[assignment]
    assert slow_writer.submit(PROMPT, kv(PROMPT))
    assert disk.entered.wait(10)
    disk.clear()
    disk.release.set()
    assert slow_writer.drain(10)
    assert len(disk) == 0 and chunk_files(disk.directory) == []


def test_stop_writes_what_is_queued(tmp_path: Path) -> None:
    disk = LocalDiskBackend(SPACE, tmp_path, 1 << 20)
    writer = WriteBehind(disk, 1 << 20)
    writer.start()
    writer.submit(PROMPT, kv(PROMPT))
    writer.stop()
    assert disk.contains(PROMPT) == 10 and not writer.submit(PROMPT, kv(PROMPT))


def test_a_failed_store_does_not_end_the_thread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = LocalDiskBackend(SPACE, tmp_path, 1 << 20)
    writer = WriteBehind(disk, 1 << 20)
    writer.start()
    try:
        assert writer.submit(PROMPT, kv(PROMPT[:8]))  # two tensors for three chunks: the store raises
        assert writer.drain(10)
        assert "write-behind store of 10 tokens failed" in caplog.text
        assert writer.submit(PROMPT, kv(PROMPT)) and writer.drain(10)
        assert disk.contains(PROMPT) == 10
    finally:
        writer.stop()
