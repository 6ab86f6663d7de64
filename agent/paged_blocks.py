"""The worker side of an engine connector: chunks moved between the engine's paged KV cache and the
agent as whole blocks, and the layout tag that says what those blocks' bytes mean.

A block's interior depends on the attention kernel (vLLM's CPU kernel keeps K transposed inside
each block, for one), so a chunk is stored as the blocks that hold it, copied whole, and is only
ever loaded back into a cache of the same layout. A chunk of `chunk_size` tokens is
chunk_size / block_size blocks; a prompt's trailing partial chunk is the blocks that hold it, its
last block partly filled, and only its full blocks are ever loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kvbus.agent.connector_plan import LoadSpec, SaveSpec
from kvbus.shared.hashing import HashSpace

log = logging.getLogger("kvbus.agent.paged")


@dataclass(frozen=True)
class Layout:
    """What a stored block's bytes mean. `backend` is None where it is not known (the scheduler side)."""

    model: str
    dtype: str
    block_size: int
    backend: str | None = None

    def __str__(self) -> str:
        return f"{self.model}|{self.dtype}|{self.block_size}|{self.backend or ''}"

    @classmethod
    def parse(cls, text: str) -> Layout:
        """ValueError if `text` is not a `str(Layout)`."""
        parts = text.rsplit("|", 3)
        if len(parts) != 4 or not parts[2].isdigit():
            raise ValueError(f"not a layout tag: {text!r}")
        model, dtype, block_size, backend = parts
        return cls(model, dtype, int(block_size), backend or None)

    def compatible(self, other: Layout) -> bool:
        """Whether blocks of one can be loaded into a cache of the other; an unknown backend matches any."""
        if (self.model, self.dtype, self.block_size) != (other.model, other.dtype, other.block_size):
            return False
        return self.backend is None or other.backend is None or self.backend == other.backend


class ChunkStore(Protocol):
    """What the worker side needs of the agent's tiers (or of one backend, in tests)."""

    def store(self, tokens: Sequence[int], kv: Sequence[torch.Tensor]) -> int: ...

    def retrieve(self, tokens: Sequence[int]) -> list[torch.Tensor]: ...


class PagedKV:
    """The engine's per-layer paged caches, indexed by block id along `block_dim`."""

    def __init__(self, layers: Sequence[torch.Tensor], block_dim: int, block_size: int) -> None:
        if not layers:
            raise ValueError("no KV cache layers")
        self._blocks = [layer.movedim(block_dim, 0) for layer in layers]  # views: writes reach the cache
        self.block_size = block_size
        shapes = {(b.shape[1:], b.dtype) for b in self._blocks}
        if len(shapes) != 1:
            raise ValueError(f"KV cache layers differ in block shape or dtype: {sorted(map(str, shapes))}")
        self.block_shape = tuple(self._blocks[0].shape[1:])
        self.dtype = self._blocks[0].dtype

    def chunk_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (len(self._blocks), num_blocks, *self.block_shape)

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The blocks, all layers, as one new tensor [layers, blocks, *block_shape]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self._blocks[0].device)
        return torch.stack([blocks.index_select(0, index) for blocks in self._blocks])

    def scatter(self, chunk: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Write the first len(block_ids) blocks of `chunk` (from `gather`) into those blocks."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self._blocks[0].device)
        for layer, blocks in enumerate(self._blocks):
            blocks.index_copy_(0, index, chunk[layer, : len(block_ids)].to(blocks.device, non_blocking=True))


class BlockMover:
    """Runs a step's loads before the forward and its saves after it, and remembers the blocks
    that could not be loaded, which the engine then recomputes."""

    def __init__(self, store: ChunkStore, paged: PagedKV, space: HashSpace) -> None:
        if space.chunk_size % paged.block_size:
            raise ValueError(f"chunk_size {space.chunk_size} is not a multiple of block size {paged.block_size}")
        self._store = store
        self._paged = paged
        self._space = space
        self._per_chunk = space.chunk_size // paged.block_size
        self._failed: set[int] = set()
        # req_id -> position of its first block that failed to load this step: no chunk from there on is saved.
        self._failed_from: dict[str, int] = {}

    def load(self, specs: Sequence[LoadSpec]) -> None:
        self._failed_from.clear()
        for spec in specs:
            loaded = self._load(spec)
            if loaded < len(spec.block_ids):
                self._failed.update(spec.block_ids[loaded:])
                self._failed_from[spec.req_id] = spec.first_block + loaded
                log.warning(
                    "request %s: %d of %d blocks were gone from the agent (cleared or evicted since the "
                    "lookup); the engine recomputes them",
                    spec.req_id,
                    len(spec.block_ids) - loaded,
                    len(spec.block_ids),
                )

    def _load(self, spec: LoadSpec) -> int:
        """Fill the spec's blocks in order from the held chunks; returns how many were filled."""
        chunks = self._store.retrieve(spec.tokens)
        bounds = self._space.chunks(spec.tokens)
        done = 0
        while done < len(spec.block_ids):
            position = spec.first_block + done
            index, offset = divmod(position, self._per_chunk)
            if index >= len(chunks):
                break
            chunk = chunks[index]
            num_blocks = -(-bounds[index].num_tokens // self._paged.block_size)
            if chunk.shape != self._paged.chunk_shape(num_blocks) or chunk.dtype != self._paged.dtype:
                log.error(
                    "chunk %s has shape %s %s, not %s %s: not loaded",
                    bounds[index].key,
                    tuple(chunk.shape),
                    chunk.dtype,
                    self._paged.chunk_shape(num_blocks),
                    self._paged.dtype,
                )
                break
            # Only whole blocks: the partly filled last block of a partial chunk is never loaded.
            full = bounds[index].num_tokens // self._paged.block_size
            take = min(full - offset, len(spec.block_ids) - done)
            if take <= 0:
                break
            self._paged.scatter(chunk[:, offset : offset + take], spec.block_ids[done : done + take])
            done += take
        return done

    def save(self, specs: Sequence[SaveSpec]) -> None:
        for spec in specs:
            tokens = spec.tokens
            failed_at = self._failed_from.get(spec.req_id)
            if failed_at is not None:
                # Blocks from the failed one on hold garbage this step; keep only the chunks before it.
                tokens = tokens[: failed_at * self._paged.block_size // self._space.chunk_size * self._space.chunk_size]
            chunks = self._space.chunks(tokens)
            if not chunks:
                continue
            kv = [
                self._paged.gather(
                    spec.block_ids[c.start // self._paged.block_size : -(-c.end // self._paged.block_size)]
                )
                for c in chunks
            ]
            self._store.store(tokens, kv)
        self._failed_from.clear()

    def take_failed_blocks(self) -> set[int]:
        """Blocks that failed to load since the last call."""
        failed, self._failed = self._failed, set()
        return failed
