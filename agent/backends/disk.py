"""LocalDiskBackend: one chunk file per chunk (chunk_format.py) in a directory, within a byte capacity,
evicted least recently used. A file that fails its checks on read is treated as missing, never returned.

Files are written to a temporary name and renamed into place, so a crashed writer leaves a stray `.tmp`
(removed on the next start) and never a half-written chunk under a chunk's name. No fsync: after a power
loss a torn file fails its checksum, which costs a recompute, not wrong KV.

File I/O runs outside the backend's lock, so a slow read or write never stalls `contains` or the index
writer's snapshot; only renames, unlinks and the bookkeeping happen under it. On start, the files already
in the directory are adopted (their headers read, not their payloads: those are checked when read), in
the order they were last used, and the agent's first `publish_all` puts them back in the index.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from kvbus.agent import chunk_format
from kvbus.agent.backends.base import IndexEntry, IndexListener, StorageBackend, chunks_with_tensors
from kvbus.agent.chunk_format import ChunkFormatError
from kvbus.shared.hashing import Chunk, HashSpace
from kvbus.shared.locations import Location
from kvbus.shared.records import BackendStats

log = logging.getLogger("kvbus.agent.backends")

SUFFIX = ".kvchunk"
_TMP_SUFFIX = ".tmp"


class _File(NamedTuple):
    entry: IndexEntry
    payload_bytes: int


class LocalDiskBackend(StorageBackend):
    location = Location.DISK

    def __init__(
        self,
        space: HashSpace,
        directory: str | os.PathLike[str],
        capacity_bytes: int,
        listener: IndexListener | None = None,
        *,
        layout: str = "",
    ) -> None:
        """Adopt the chunk files `directory` already holds, within `capacity_bytes` of payload.

        Capacity counts payload bytes, as the memory backends count tensor bytes; each file adds
        a header of about 300 bytes.
        """
        super().__init__(space, listener)
        self.directory = Path(directory)
        self._capacity = capacity_bytes
        self._layout = layout
        self._files: OrderedDict[str, _File] = OrderedDict()
        self._used = 0
        self._tokens = 0  # kept running, so stats() on every heartbeat does not walk every file
        self._clock = 0  # the last mtime handed out: strictly increasing, so file times order uses exactly
        self._epoch = 0  # bumped by every clear, so writes begun before it do not land after it
        self.directory.mkdir(parents=True, exist_ok=True)
        self._adopt()

    @property
    def epoch(self) -> int:
        return self._epoch

    # Public API beyond StorageBackend: runs of chunks, so a caller that got a prefix elsewhere continues here.
    def count_held(self, chunks: Sequence[Chunk]) -> int:
        """How many of `chunks`, from the first, this backend holds."""
        with self.lock:
            for held, chunk in enumerate(chunks):
                if chunk.key not in self._files:
                    return held
            return len(chunks)

    def load(self, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
        """The tensors of the longest held run of `chunks` from the first, read and verified."""
        found: list[torch.Tensor] = []
        for chunk in chunks:
            tensor = self._get(chunk.key)
            if tensor is None:
                break
            found.append(tensor)
        with self.lock:
            self._touch_prefix([c.key for c in chunks[: len(found)]])
        return found

    def store(self, tokens: Sequence[int], kv: Sequence[torch.Tensor], *, epoch: int | None = None) -> int:
        """As StorageBackend.store, writing outside the lock; with `epoch`, nothing lands after a later clear."""
        chunks = chunks_with_tensors(self.space, tokens, kv)
        epoch = self._epoch if epoch is None else epoch
        stored = 0
        for chunk, tensor in zip(chunks, kv, strict=True):
            if not self._write(IndexEntry(chunk.key, chunk.num_tokens, chunk.start == 0), tensor, epoch):
                break
            stored = chunk.end
        with self.lock:
            self._touch_prefix([c.key for c in chunks])
        return stored

    def retrieve(self, tokens: Sequence[int]) -> list[torch.Tensor]:
        return self.load(self.space.chunks(tokens))

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def _put(self, entry: IndexEntry, tensor: torch.Tensor) -> bool:
        return self._write(entry, tensor, self._epoch)

    def _write(self, entry: IndexEntry, tensor: torch.Tensor, epoch: int) -> bool:
        """Keep `tensor` as `entry`'s file; False when it can never fit, the disk failed, or a clear came first."""
        with self.lock:
            if entry.key in self._files:
                return True
        size = tensor.numel() * tensor.element_size()
        if not self._could_ever_fit(size):
            return False
        try:
            temp = self._write_temp(entry, tensor)
        except OSError as exc:
            log.warning(
                "%s: could not write chunk %s to %s (%s); not stored", self.location, entry.key, self.directory, exc
            )
            return False
        with self.lock:
            if entry.key in self._files or epoch != self._epoch:
                _unlink(temp)
                return entry.key in self._files
            while self._used + size > self._capacity:
                self._evicted(self._discard(next(iter(self._files))))
            try:
                os.replace(temp, self._path(entry.key))
            except OSError as exc:
                _unlink(temp)
                log.warning("%s: could not place chunk %s (%s); not stored", self.location, entry.key, exc)
                return False
            self._files[entry.key] = _File(entry, size)
            self._used += size
            self._tokens += entry.num_tokens
            self._admitted(entry)
        return True

    def _write_temp(self, entry: IndexEntry, tensor: torch.Tensor) -> str:
        handle, temp = tempfile.mkstemp(prefix=f".{entry.key}.", suffix=_TMP_SUFFIX, dir=self.directory)
        try:
            with os.fdopen(handle, "wb") as out:
                chunk_format.write_file(
                    out,
                    tensor,
                    key=entry.key,
                    space=self.space.name,
                    layout=self._layout,
                    num_tokens=entry.num_tokens,
                    is_head=entry.is_head,
                )
        except BaseException:
            _unlink(temp)
            raise
        return temp

    def _get(self, key: str) -> torch.Tensor | None:
        with self.lock:
            held = self._files.get(key)
        if held is None:
            return None
        try:
            return self._read(key)
        except (OSError, ChunkFormatError) as exc:
            with self.lock:
                if self._files.get(key) is held:  # not already replaced by a fresh copy
                    self._evicted(self._discard(key))
            log.warning(
                "%s: chunk %s in %s is unusable (%s); dropped, and it will be recomputed",
                self.location,
                key,
                self.directory,
                exc,
            )
            return None

    def _read(self, key: str) -> torch.Tensor:
        with open(self._path(key), "rb") as handle:
            start = chunk_format.read_start(handle)
            if start.header.key != key:
                raise ChunkFormatError(f"the file holds chunk {start.header.key}")
            return chunk_format.read_payload(handle, start)

    def _has(self, key: str) -> bool:
        return key in self._files

    def _discard(self, key: str) -> IndexEntry | None:
        held = self._files.pop(key, None)
        if held is None:
            return None
        _unlink(self._path(key))
        self._used -= held.payload_bytes
        self._tokens -= held.entry.num_tokens
        return held.entry

    def _clear(self) -> int:
        """Delete every chunk file, under the lock: unlinks cost ~16 us each here, so 10k chunks hold it ~0.16 s."""
        self._epoch += 1
        freed = sum(held.entry.num_tokens for held in self._files.values())
        for key in self._files:
            _unlink(self._path(key))
        self._files.clear()
        self._used = 0
        self._tokens = 0
        return freed

    def _entries(self) -> list[IndexEntry]:
        return [held.entry for held in self._files.values()]

    def _touch_prefix(self, keys: list[str]) -> None:
        # The file times carry the order across a restart, which adopts files oldest first.
        for key in reversed(keys):
            if key in self._files:
                self._files.move_to_end(key)
                self._clock = max(self._clock + 1, time.time_ns())
                # A file gone behind our back is found out, and dropped, by its next read.
                with contextlib.suppress(OSError):
                    os.utime(self._path(key), ns=(self._clock, self._clock))

    def _adopt(self) -> None:
        found: list[tuple[int, _File]] = []
        removed = 0
        for item in os.scandir(self.directory):
            if item.name.endswith(_TMP_SUFFIX):
                _unlink(item.path)  # a write that never finished
                continue
            if not item.name.endswith(SUFFIX):
                continue
            key = item.name.removesuffix(SUFFIX)
            try:
                with open(item.path, "rb") as handle:
                    start = chunk_format.read_start(handle)
                header = start.header
                stat = item.stat()
                usable = (
                    header.key == key
                    and header.space == self.space.name
                    and header.layout == self._layout
                    and stat.st_size == start.file_bytes
                )
            except (OSError, ChunkFormatError):
                usable = False
            if not usable:
                _unlink(item.path)
                removed += 1
                continue
            found.append(
                (stat.st_mtime_ns, _File(IndexEntry(key, header.num_tokens, header.is_head), header.payload_bytes))
            )
        found.sort(key=lambda pair: pair[0])
        for mtime, held in found:
            self._files[held.entry.key] = held
            self._used += held.payload_bytes
            self._tokens += held.entry.num_tokens
            self._clock = max(self._clock, mtime)
        while self._used > self._capacity:
            self._discard(next(iter(self._files)))
            removed += 1
        if found or removed:
            log.info(
                "%s: adopted %d chunks (%d tokens, %.1f MB) from %s; removed %d unusable or over capacity",
                self.location,
                len(self._files),
                sum(h.entry.num_tokens for h in self._files.values()),
                self._used / 1e6,
                self.directory,
                removed,
            )

    def __len__(self) -> int:
        return len(self._files)

    def stats(self) -> BackendStats:
        with self.lock:
            return BackendStats(
                chunks=len(self._files), tokens=self._tokens, bytes=self._used, capacity_bytes=self._capacity
            )

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def capacity_bytes(self) -> int:
        return self._capacity


def _unlink(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
