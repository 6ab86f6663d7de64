"""TieredStore: an engine's stores and lookups across the memory tier and the disk behind it.

A store lands in memory at once and reaches the disk through the write-behind thread; a lookup takes
memory's prefix and continues it from disk, so a chunk evicted from memory is still a hit while the
disk keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvbus.agent.backends.base import StorageBackend, chunks_with_tensors
from kvbus.agent.backends.disk import LocalDiskBackend
from kvbus.agent.write_behind import WriteBehind
from kvbus.shared.hashing import HashSpace

# Stores waiting for the disk, in bytes. They are mostly the memory tier's own tensors, so the
# queue costs little memory of its own; the bound caps how far the disk may fall behind.
DISK_QUEUE_BYTES = 1024**3


class TieredStore:
    """The first backend not on disk is the memory tier, the first on disk the disk tier; either may be absent."""

    def __init__(
        self, space: HashSpace, backends: Sequence[StorageBackend], *, disk_queue_bytes: int = DISK_QUEUE_BYTES
    ) -> None:
        self.space = space
        self._memory = next((b for b in backends if not isinstance(b, LocalDiskBackend)), None)
        self._disk = next((b for b in backends if isinstance(b, LocalDiskBackend)), None)
        self.disk_writer = WriteBehind(self._disk, disk_queue_bytes) if self._disk is not None else None

    def start(self) -> None:
        if self.disk_writer is not None:
            self.disk_writer.start()

    def stop(self) -> None:
        """Write the stores still queued for the disk, so a restart finds them."""
        if self.disk_writer is not None:
            self.disk_writer.stop()

    def store(self, tokens: Sequence[int], kv: Sequence[torch.Tensor]) -> int:
        """Keep a prompt's KV in memory now and on disk soon; returns the tokens held (in memory, if any)."""
        held = self._memory.store(tokens, kv) if self._memory is not None else 0
        if self._disk is not None and self.disk_writer is not None:
            chunks = chunks_with_tensors(self.space, tokens, kv)
            if self._disk.count_held(chunks) < len(chunks):
                # The memory tier's copies never change; the caller's tensors might once this returns.
                owned = self._memory.retrieve(tokens) if self._memory is not None else []
                self.disk_writer.submit(tokens, [*owned, *(t.detach().to("cpu", copy=True) for t in kv[len(owned) :])])
            if self._memory is None:
                held = self._disk.contains(tokens)
        return held

    def retrieve(self, tokens: Sequence[int]) -> list[torch.Tensor]:
        """The longest held prefix: from memory, then from disk for the chunks memory lacks."""
        found = self._memory.retrieve(tokens) if self._memory is not None else []
        if self._disk is not None:
            chunks = self.space.chunks(tokens)
            if len(found) < len(chunks):
                found += self._disk.load(chunks[len(found) :])
        return found

    def contains(self, tokens: Sequence[int]) -> int:
        """The tokens `retrieve` would return now: memory's prefix, continued from disk."""
        held = self._memory.contains(tokens) if self._memory is not None else 0
        if self._disk is not None:
            chunks = self.space.chunks(tokens)
            first = -(-held // self.space.chunk_size)
            more = self._disk.count_held(chunks[first:])
            if more:
                held = chunks[first + more - 1].end
        return held
