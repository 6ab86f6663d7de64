"""The storage backend contract: chunks of KV kept somewhere, found by token prefix.

A backend knows nothing of Redis. It tells an IndexListener about every admission,
eviction and clear, in order and under its lock, and the listener keeps the index.

Pinning and compression are optional: their public methods work on any backend through
protected hooks that refuse with UnsupportedOperation until a backend implements them.
A request the backend cannot carry out raises Refused; a caller's bug stays a ValueError.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, NamedTuple, Protocol

import torch

from kvbus.agent import codecs
from kvbus.agent.codecs import Packed
from kvbus.agent.refused import Refused
from kvbus.shared.hashing import Chunk, HashSpace
from kvbus.shared.locations import Location
from kvbus.shared.records import BackendStats

log = logging.getLogger("kvbus.agent.backends")


class UnsupportedOperation(Refused):
    """This backend does not implement the operation asked of it (pin, compress, ...)."""


def chunks_with_tensors(space: HashSpace, tokens: Sequence[int], kv: Sequence[torch.Tensor]) -> list[Chunk]:
    """The chunks of `tokens`, which `kv` must hold one tensor for each of; ValueError if it does not."""
    chunks = space.chunks(tokens)
    if len(kv) != len(chunks):
        raise ValueError(f"{len(chunks)} chunks of {len(tokens)} tokens need {len(chunks)} tensors, got {len(kv)}")
    return chunks


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
        chunks = chunks_with_tensors(self.space, tokens, kv)
        stored = 0
        with self.lock:
            for chunk, tensor in zip(chunks, kv, strict=True):
                if not self._put(IndexEntry(chunk.key, chunk.num_tokens, chunk.start == 0), tensor):
                    break
                stored = chunk.end
            self._touch_prefix([c.key for c in chunks])
        return stored

    def retrieve(self, tokens: Sequence[int]) -> list[torch.Tensor]:
        """The tensors of the longest held prefix of `tokens`, one per chunk, in order.

        A compressed chunk comes back decoded, as a new tensor of the shape, dtype and device it
        was stored with (within its method's error bound); it is decoded outside the lock.
        """
        found: list[torch.Tensor | Packed] = []
        keys: list[str] = []
        with self.lock:
            for chunk in self.space.chunks(tokens):
                held = self._get(chunk.key)
                if held is None:
                    break
                found.append(held)
                keys.append(chunk.key)
            self._touch_prefix(keys)
        return [held.decode() if isinstance(held, Packed) else held for held in found]

    def export(self, tokens: Sequence[int]) -> tuple[list[IndexEntry], list[torch.Tensor]]:
        """The chunks of the held prefix of `tokens`, or every held chunk if `tokens` is empty, with
        their entries, decoded: what a move hands to another backend or agent."""
        with self.lock:
            if tokens:
                entries = []
                for chunk in self.space.chunks(tokens):
                    if not self._has(chunk.key):
                        break
                    entries.append(IndexEntry(chunk.key, chunk.num_tokens, chunk.start == 0))
            else:
                entries = self._entries()
            found = [(entry, self._get(entry.key)) for entry in entries]
        kept: list[IndexEntry] = []
        tensors: list[torch.Tensor] = []
        for entry, held in found:
            if held is None:  # gone while read (a damaged file): a prefix ends there
                if tokens:
                    break
                continue
            kept.append(entry)
            tensors.append(held.decode() if isinstance(held, Packed) else held)
        return kept, tensors

    def adopt(self, entries: Sequence[IndexEntry], kv: Sequence[torch.Tensor]) -> list[str]:
        """Keep chunks another backend exported, by their entries; returns the keys now held."""
        if len(entries) != len(kv):
            raise ValueError(f"{len(entries)} entries need {len(entries)} tensors, got {len(kv)}")
        with self.lock:
            return [entry.key for entry, tensor in zip(entries, kv, strict=True) if self._put(entry, tensor)]

    def contains(self, tokens: Sequence[int]) -> int:
        """How many tokens of `tokens`, from position 0, this backend holds."""
        with self.lock:
            return self._held_prefix(tokens)[1]

    def discard(self, key: str) -> int:
        """Free one chunk by key, as an eviction would; returns the tokens it held (0 if absent or pinned)."""
        with self.lock:
            entry = self._discard(key)
            if entry is None:
                return 0
            self._evicted(entry)
            return entry.num_tokens

    def clear(self) -> int:
        """Free every chunk but the pinned ones; returns the tokens of the chunks freed.

        Pinned survivors go to the listener as one replacement of the location's index, which
        costs one op per survivor rather than one per freed chunk.
        """
        with self.lock:
            freed = self._clear()
            if self.listener is not None:
                survivors = self._entries()
                if survivors:
                    self.listener.replaced(self.location, survivors)
                else:
                    self.listener.cleared(self.location)
        return freed

    def holds_detached(self) -> bool:
        """Whether a clear() detached chunks whose memory is not freed yet (see `release_detached`)."""
        return False

    def release_detached(self) -> None:
        """Free the memory of chunks a clear() detached but left to free later, if this backend does so.

        The agent calls it once a clear's answer is out; the backend frees it anyway before it takes
        new chunks, so a caller that never calls it only holds memory for longer.
        """
        return  # a backend that frees at once, as the disk one does, has nothing left to free

    def pin(self, tokens: Sequence[int]) -> int:
        """Pin the chunks of the longest held prefix of `tokens`; returns that prefix's tokens (0 if none).

        A pinned chunk survives eviction and clear() until unpinned. Pinning is a flag, not a
        count: pinning twice then unpinning once leaves the chunk unpinned.
        """
        with self.lock:
            keys, held = self._held_prefix(tokens)
            self._set_pinned(keys, True)
        return held

    def unpin(self, tokens: Sequence[int]) -> int:
        """Unpin the chunks of the longest held prefix of `tokens`; returns that prefix's tokens.

        Chunks of the prefix that were not pinned count too: the answer says how much of `tokens`
        is now held unpinned, the same figure pin() gave, whatever was pinned before.
        """
        with self.lock:
            keys, held = self._held_prefix(tokens)
            self._set_pinned(keys, False)
        return held

    def compress(self, tokens: Sequence[int], method: str) -> int:
        """Compress the chunks of the held prefix of `tokens` (every held chunk if `tokens` is empty).

        Returns the tokens of those chunks now compressed with `method`, those that already were
        included. A chunk compressed with another method is left alone and not counted, and so is
        one the method cannot take (int8 on integers, inf or nan) or would not make smaller.
        Refused for an unknown method, naming the known ones.
        """
        codecs.known_method(method)
        return self._compress_keys(self._targets(tokens), method)

    def decompress(self, tokens: Sequence[int], method: str) -> int:
        """Decompress the chunks of the held prefix of `tokens` (every held chunk if `tokens` is empty).

        Only chunks compressed with `method` are decoded. Returns the tokens of the chunks now
        plain, those that already were included. Growing back may evict unpinned chunks; a chunk
        that cannot fit even then stays compressed and is not counted. Refused for an unknown
        method, naming the known ones.
        """
        codecs.known_method(method)
        return self._decompress_keys(self._targets(tokens), method, prefix=bool(tokens))

    def stats(self) -> BackendStats:
        """Counts for metrics: chunks, tokens, bytes and capacity held, and how much of it is pinned or compressed.

        This default is for backends without pinning or compression, and counts tokens in O(chunks).
        """
        with self.lock:
            return BackendStats(
                chunks=len(self),
                tokens=sum(entry.num_tokens for entry in self._entries()),
                bytes=self.used_bytes,
                capacity_bytes=self.capacity_bytes,
            )

    def publish_all(self) -> None:
        """Hand the listener the full set of held chunks, as one replacement of what it had."""
        with self.lock:
            if self.listener is not None:
                self.listener.replaced(self.location, self._entries())

    def _held_prefix(self, tokens: Sequence[int]) -> tuple[list[str], int]:
        keys: list[str] = []
        held = 0
        for chunk in self.space.chunks(tokens):
            if not self._has(chunk.key):
                break
            keys.append(chunk.key)
            held = chunk.end
        return keys, held

    def _targets(self, tokens: Sequence[int]) -> list[str]:
        with self.lock:
            if not tokens:
                return [entry.key for entry in self._entries()]
            return self._held_prefix(tokens)[0]

    def _could_ever_fit(self, size: int) -> bool:
        if size <= self.capacity_bytes:
            return True
        log.warning(
            "%s: a %d-byte chunk exceeds the whole capacity of %d bytes; not stored",
            self.location,
            size,
            self.capacity_bytes,
        )
        return False

    def _unsupported(self, operation: str) -> UnsupportedOperation:
        return UnsupportedOperation(f"{self.location} does not support {operation}")

    def _set_pinned(self, keys: list[str], pinned: bool) -> None:
        """Pin or unpin these held chunks; called under the lock, with an empty list too."""
        raise self._unsupported("pin" if pinned else "unpin")

    def _compress_keys(self, keys: list[str], method: str) -> int:
        """compress() for these chunks, taking the lock itself; `method` is known."""
        raise self._unsupported("compress")

    def _decompress_keys(self, keys: list[str], method: str, *, prefix: bool) -> int:
        """decompress() for these chunks, taking the lock itself; `prefix`: they are a prompt's, head first."""
        raise self._unsupported("decompress")

    def _admitted(self, entry: IndexEntry) -> None:
        if self.listener is not None:
            self.listener.admitted(self.location, entry)

    def _evicted(self, entry: IndexEntry | None) -> None:
        """Report a chunk gone; None (nothing was there to discard) reports nothing."""
        if self.listener is not None and entry is not None:
            self.listener.evicted(self.location, entry)

    @abstractmethod
    def _put(self, entry: IndexEntry, tensor: torch.Tensor) -> bool:
        """Keep a copy of `tensor`; False when it can never fit."""

    @abstractmethod
    def _get(self, key: str) -> torch.Tensor | Packed | None:
        """The chunk as held: a compressed one is decoded by the caller, outside the lock."""

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
