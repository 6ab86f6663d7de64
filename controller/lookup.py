"""Prefix lookup over the Redis index: which live instances hold how much of a prompt, from token 0.

Cost is flat in the number of instances. The first chunk's key names a small set of
candidate instances (the `head` sets); only those are read, with one HMGET per
candidate and location, all in one pipeline. Each candidate is credited with its own
contiguous prefix, across its locations, and instances without a heartbeat are skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio

from kvbus.shared import keys
from kvbus.shared.hashing import Chunk, chunk_keys
from kvbus.shared.locations import FASTEST_FIRST, Location

_INLINE_HASH_TOKENS = 32_768  # longer prompts are hashed off the event loop


@dataclass(frozen=True)
class Match:
    instance_id: str
    location: Location  # where the last matched chunk is, fastest first when it is in several
    num_tokens: int


class PrefixIndex:
    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._redis = client

    async def lookup(self, tokens: Sequence[int]) -> list[Match]:
        """Every live instance holding a prefix of `tokens`, longest first."""
        spaces = sorted(await self._redis.smembers(keys.HASH_SPACES))
        if len(tokens) > _INLINE_HASH_TOKENS:
            chains = await asyncio.to_thread(_chains, tokens, spaces)
        else:
            chains = _chains(tokens, spaces)
        if not chains:
            return []
        candidates = await self._candidates(chains)
        if not candidates:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for instance_id, chain in candidates:
            pipe.exists(keys.alive(instance_id))
            for location in FASTEST_FIRST:
                pipe.hmget(keys.index(instance_id, location), [chunk.key for chunk in chain])
        replies = await pipe.execute()
        per = 1 + len(FASTEST_FIRST)
        matches = []
        for n, (instance_id, chain) in enumerate(candidates):
            alive, *held = replies[n * per : (n + 1) * per]
            match = _contiguous(instance_id, chain, held) if alive else None
            if match is not None:
                matches.append(match)
        matches.sort(key=lambda m: (-m.num_tokens, m.instance_id))
        return matches

    async def _candidates(self, chains: list[list[Chunk]]) -> list[tuple[str, list[Chunk]]]:
        pipe = self._redis.pipeline(transaction=False)
        for chain in chains:
            for location in FASTEST_FIRST:
                pipe.smembers(keys.head(location, chain[0].key))
        replies = await pipe.execute()
        found: dict[str, list[Chunk]] = {}
        for n, chain in enumerate(chains):
            for members in replies[n * len(FASTEST_FIRST) : (n + 1) * len(FASTEST_FIRST)]:
                for instance_id in members:
                    found.setdefault(instance_id, chain)
        return sorted(found.items())


def _chains(tokens: Sequence[int], spaces: list[str]) -> list[list[Chunk]]:
    """The chunk keys of `tokens` in every hash space the fleet registered (usually one)."""
    chains = []
    for space in spaces:
        size, _, model = space.partition(":")
        if not size.isdigit() or int(size) < 1:
            continue
        chains.append(chunk_keys(tokens, model=model, chunk_size=int(size), save_unfull_chunk=True))
    return chains


def _contiguous(instance_id: str, chain: list[Chunk], held: list[list[str | None]]) -> Match | None:
    matched = 0
    location: Location | None = None
    for i, chunk in enumerate(chain):
        where = next((loc for loc, values in zip(FASTEST_FIRST, held, strict=True) if values[i] is not None), None)
        if where is None:
            break
        matched, location = chunk.end, where
    return Match(instance_id, location, matched) if location is not None else None
