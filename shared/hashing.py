"""Chunk keys: one chained hash per chunk of tokens, the same in every process and on every machine.

A chunk's key commits to every token from position 0 to the chunk's end and to the
model, so equal keys mean equal KV, and two models never share a key. The hash is
blake2b (not Python's `hash()`), so it does not depend on PYTHONHASHSEED.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

DIGEST_BYTES = 16  # 128 bits: a collision would serve one prompt another prompt's KV.
TOKEN_LIMIT = 2**32
_ROOT_DOMAIN = b"kvbus/chunk/v1\x00"

if array("I").itemsize != 4:  # pragma: no cover - every platform torch supports has 4-byte uint
    raise ImportError("kvbus chunk hashing needs a 4-byte unsigned int array type")


class Chunk(NamedTuple):
    key: str  # hex digest; the field name in the Redis index
    start: int  # first token position covered
    end: int  # one past the last token position covered

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def chunk_keys(tokens: Sequence[int], *, model: str, chunk_size: int, save_unfull_chunk: bool = True) -> list[Chunk]:
    """Cut `tokens` into `chunk_size` chunks and key each by the hash of all tokens up to its end.

    A trailing partial chunk is keyed only when `save_unfull_chunk` is true.
    Raises ValueError for a token outside 0..2**32-1 or a chunk size below 1.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    packed = _pack(tokens)
    parent = hashlib.blake2b(_ROOT_DOMAIN + model.encode(), digest_size=DIGEST_BYTES).digest()
    chunks: list[Chunk] = []
    total = len(tokens)
    for start in range(0, total, chunk_size):
        end = min(start + chunk_size, total)
        if end - start < chunk_size and not save_unfull_chunk:
            break
        parent = hashlib.blake2b(parent + packed[start * 4 : end * 4], digest_size=DIGEST_BYTES).digest()
        chunks.append(Chunk(parent.hex(), start, end))
    return chunks


def _pack(tokens: Sequence[int]) -> bytes:
    try:
        packed = array("I", tokens)
    except (OverflowError, TypeError) as exc:
        bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t < TOKEN_LIMIT), None)
        raise ValueError(f"token ids must be integers in 0..{TOKEN_LIMIT - 1}, got {bad!r}") from exc
    if sys.byteorder == "big":
        packed.byteswap()  # little-endian on the wire, whatever the host
    return packed.tobytes()


@dataclass(frozen=True)
class HashSpace:
    """What a chunk key depends on besides the tokens. Agents register theirs by `name`;
    the controller hashes a lookup once per registered space."""

    model: str
    chunk_size: int
    save_unfull_chunk: bool = True

    def chunks(self, tokens: Sequence[int]) -> list[Chunk]:
        return chunk_keys(
            tokens, model=self.model, chunk_size=self.chunk_size, save_unfull_chunk=self.save_unfull_chunk
        )

    @property
    def name(self) -> str:
        return f"{self.chunk_size}:{self.model}"

    @classmethod
    def from_name(cls, name: str) -> HashSpace:
        """The space a registered `name` stands for; ValueError if it is not one."""
        size, _, model = name.partition(":")
        if not size.isdigit() or int(size) < 1 or not model:
            raise ValueError(f"not a hash space name: {name!r}")
        return cls(model, int(size))
