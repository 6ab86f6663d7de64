"""Chunk keys: one chained hash per chunk of tokens, the same in every process and on every machine.

kvbus's own key commits to every token from position 0 to the chunk's end and to the
model, so equal keys mean equal KV, and two models never share a key. The hash is
blake2b (not Python's `hash()`), so it does not depend on PYTHONHASHSEED.

Unmodified LMCache engines key chunks their own way (`LMCacheHashSpace`): a chain of
CPython's `hash()` over tuples of ints, which kvbus reproduces so that a lookup finds
their chunks too. A lookup hashes the prompt once in every space the fleet registered.
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


@dataclass(frozen=True)
class LMCacheHashSpace:
    """LMCache 0.5.6's chunk keys with its `builtin` hash: h_0 = none_hash, h_i+1 = hash((h_i, chunk_i, ())).

    CPython's hash of ints and tuples of ints does not depend on PYTHONHASHSEED, so kvbus computes
    the same ints as the engine. `none_hash` is 0 in an engine without vLLM; with vLLM it is vLLM's
    NONE_HASH, the hash of str(PYTHONHASHSEED) (random per process when that is unset, and then no
    controller can match, LMCache's own included). The model is not part of LMCache's key.
    """

    chunk_size: int = 256
    none_hash: int = 0
    save_unfull_chunk: bool = True

    PREFIX = "lmcache"

    def chunks(self, tokens: Sequence[int]) -> list[Chunk]:
        chunks: list[Chunk] = []
        total = len(tokens)
        prefix = self.none_hash
        for start in range(0, total, self.chunk_size):
            end = min(start + self.chunk_size, total)
            if end - start < self.chunk_size and not self.save_unfull_chunk:
                break
            prefix = hash((prefix, tuple(tokens[start:end]), ()))
            chunks.append(Chunk(self.key(prefix), start, end))
        return chunks

    @staticmethod
    def key(chunk_hash: int) -> str:
        """The index field for an LMCache chunk hash."""
        return str(chunk_hash)

    @property
    def name(self) -> str:
        return f"{self.PREFIX}:{self.chunk_size}:{self.none_hash}"

    @classmethod
    def from_name(cls, name: str) -> LMCacheHashSpace:
        prefix, size, none_hash = (name.split(":") + ["", ""])[:3]
        if prefix != cls.PREFIX or not size.isdigit() or int(size) < 1 or not none_hash.lstrip("-").isdigit():
            raise ValueError(f"not an LMCache hash space name: {name!r}")
        return cls(int(size), int(none_hash))


_MASK = (1 << 64) - 1


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (64 - bits))) & _MASK


def _sipround(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _MASK
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _MASK
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _MASK
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _MASK
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def vllm_none_hash(hash_seed: int) -> int:
    """vLLM's NONE_HASH in an engine started with PYTHONHASHSEED=hash_seed: hash(str(hash_seed)) there.

    A str's hash depends on the process's seed, so it is computed here as CPython 3.11 does it:
    SipHash-1-3 of its bytes, keyed by the first 16 of 24 secret bytes that CPython derives from
    the seed with an LCG (all zero for seed 0, which turns randomisation off).
    """
    text = str(hash_seed)
    secret = bytearray(24)
    state = hash_seed
    for index in range(len(secret) if hash_seed else 0):
        state = (state * 214013 + 2531011) & 0xFFFFFFFF
        secret[index] = (state >> 16) & 0xFF
    k0, k1 = int.from_bytes(secret[0:8], "little"), int.from_bytes(secret[8:16], "little")
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573
    data = text.encode("ascii")
    whole = len(data) - len(data) % 8
    for offset in range(0, whole, 8):
        word = int.from_bytes(data[offset : offset + 8], "little")
        v3 ^= word
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= word
    last = ((len(data) & 0xFF) << 56) | int.from_bytes(data[whole:], "little")
    v3 ^= last
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= last
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    digest = v0 ^ v1 ^ v2 ^ v3
    signed = digest - (1 << 64) if digest >= (1 << 63) else digest
    return -2 if signed == -1 else signed


AnySpace = HashSpace | LMCacheHashSpace


def space_from_name(name: str) -> AnySpace:
    """Either kind of space from its registered name; ValueError if it is neither."""
    if name.startswith(f"{LMCacheHashSpace.PREFIX}:"):
        return LMCacheHashSpace.from_name(name)
    return HashSpace.from_name(name)
