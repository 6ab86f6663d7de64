"""The storage backend contract: chunks of KV kept somewhere, found by token prefix.

A backend knows nothing of Redis. It tells an IndexListener about every admission,
eviction and clear, in order and under its lock, and the listener keeps the index.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, NamedTuple, Protocol

import torch

from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location


class IndexEntry(NamedTuple):
    """A tuple of plain values, which CPython's GC stops tracking: an agent holds 100k+ of them."""

    key: str
    num_tokens: int
    is_head: bool  # the first chunk of a prompt: lookup starts from these


class IndexListener(Protocol):
    def admitted(self, location: Location, entry: IndexEntry) -> None: ...

    def evicted(self, location: Location, entry: IndexEntry) -> None: ...

    def cleared(self, location: Location) -> None: ...

    def replaced(self, location: Location, entries: list[IndexEntry]) -> None: ...


class StorageBackend(ABC):
    """Chunks keyed by chained hash, stored, retrieved and checked by token prefix."""

    location: ClassVar[Location]

    def __init__(self, space: HashSpace, listener: IndexListener | None = None) -> None:
        self.space = space
        self.listener = listener
        # Reentrant: the index writer takes it to snapshot while a backend call holds it.
        self.lock = threading.RLock()

    def store(self, tokens: Sequence[int], kv: Sequence[torch.Tensor]) -> int:
        """Keep one KV tensor per chunk of `tokens`; returns the tokens now held from position 0."""
        chunks = self.space.chunks(tokens)
        if len(kv) != len(chunks):
            raise ValueError(f"{len(chunks)} chunks of {len(tokens)} tokens need {len(chunks)} tensors, got {len(kv)}")
        stored = 0
        with self.lock:
            for chunk, tensor in zip(chunks, kv, strict=True):
                if not self._put(IndexEntry(chunk.key, chunk.num_tokens, chunk.start == 0), tensor):
                    break
                stored = chunk.end
            self._touch_prefix([c.key for c in chunks])
        return stored

    def retrieve(self, tokens: Sequence[int]) -> list[torch.Tensor]:
        """The tensors of the longest held prefix of `tokens`, one per chunk, in order."""
        found: list[torch.Tensor] = []
        keys: list[str] = []
        with self.lock:
            for chunk in self.space.chunks(tokens):
                tensor = self._get(chunk.key)
                if tensor is None:
                    break
                found.append(tensor)
                keys.append(chunk.key)
            self._touch_prefix(keys)
        return found

    def contains(self, tokens: Sequence[int]) -> int:
        """How many tokens of `tokens`, from position 0, this backend holds."""
        held = 0
        with self.lock:
            for chunk in self.space.chunks(tokens):
                if not self._has(chunk.key):
                    break
                held = chunk.end
        return held

    def discard(self, key: str) -> int:
        """Free one chunk by key, as an eviction would; returns the tokens it held (0 if absent)."""
        with self.lock:
            entry = self._discard(key)
            if entry is None:
                return 0
            self._evicted(entry)
            return entry.num_tokens

    def clear(self) -> int:
        """Free every chunk; returns the tokens they held."""
        with self.lock:
            freed = self._clear()
            if self.listener is not None:
                self.listener.cleared(self.location)
        return freed

    def publish_all(self) -> None:
        """Hand the listener the full set of held chunks, as one replacement of what it had."""
        with self.lock:
            if self.listener is not None:
                self.listener.replaced(self.location, self._entries())

    def _admitted(self, entry: IndexEntry) -> None:
        if self.listener is not None:
            self.listener.admitted(self.location, entry)

    def _evicted(self, entry: IndexEntry) -> None:
        if self.listener is not None:
            self.listener.evicted(self.location, entry)

    @abstractmethod
    def _put(self, entry: IndexEntry, tensor: torch.Tensor) -> bool:
        """Keep a copy of `tensor`; False when it can never fit."""

    @abstractmethod
    def _get(self, key: str) -> torch.Tensor | None: ...

    @abstractmethod
    def _has(self, key: str) -> bool: ...

    @abstractmethod
    def _discard(self, key: str) -> IndexEntry | None: ...

    @abstractmethod
    def _clear(self) -> int: ...

    @abstractmethod
    def _entries(self) -> list[IndexEntry]: ...

    @abstractmethod
    def _touch_prefix(self, keys: list[str]) -> None:
        """Mark a prompt's chunks used, its first chunk last: eviction then takes tails before heads."""

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @property
    @abstractmethod
    def capacity_bytes(self) -> int: ...
