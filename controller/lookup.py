"""Prefix lookup over the Redis index: which live instances hold how much of a prompt, from token 0.

Cost is flat in the number of instances. The first chunk's key names a small set of
candidate instances (the `head` sets); only those are read, with one HMGET per
candidate and location in use, all in one pipeline. Each candidate is credited with its
own contiguous prefix, across its locations, and instances without a heartbeat are skipped.

Two round trips in the usual case: the fleet's hash spaces and locations rarely change,
so the head sets for the last ones seen are read speculatively alongside them.
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


@dataclass(frozen=True)
class _Fleet:
    """What every lookup hashes with and reads from; a speculation hint, never trusted unchecked."""

    spaces: tuple[str, ...] = ()
    locations: tuple[Location, ...] = ()


class PrefixIndex:
    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._redis = client
        self._fleet = _Fleet()

    async def lookup(self, tokens: Sequence[int]) -> list[Match]:
        """Every live instance holding a prefix of `tokens`, longest first."""
        guess = self._fleet
        guess_chains = await self._hash(tokens, guess.spaces)
        pipe = self._redis.pipeline(transaction=False)
        pipe.smembers(keys.HASH_SPACES)
        pipe.smembers(keys.LOCATIONS)
        _read_heads(pipe, guess_chains, guess.locations)
        spaces, locations, *heads = await pipe.execute()
        fleet = _Fleet(tuple(sorted(spaces)), tuple(loc for loc in FASTEST_FIRST if loc in locations))
        if fleet == guess:
            chains = guess_chains
        else:
            self._fleet = fleet
            chains = await self._hash(tokens, fleet.spaces)
            pipe = self._redis.pipeline(transaction=False)
            _read_heads(pipe, chains, fleet.locations)
            heads = await pipe.execute()
        candidates = _candidates(chains, heads, len(fleet.locations))
        if not candidates:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for instance_id, chain in candidates:
            pipe.exists(keys.alive(instance_id))
            for location in fleet.locations:
                pipe.hmget(keys.index(instance_id, location), [chunk.key for chunk in chain])
        replies = await pipe.execute()
        per = 1 + len(fleet.locations)
        matches = []
        for n, (instance_id, chain) in enumerate(candidates):
            alive, *held = replies[n * per : (n + 1) * per]
            match = _contiguous(instance_id, chain, fleet.locations, held) if alive else None
            if match is not None:
                matches.append(match)
        matches.sort(key=lambda m: (-m.num_tokens, m.instance_id))
        return matches

    @staticmethod
    async def _hash(tokens: Sequence[int], spaces: tuple[str, ...]) -> list[list[Chunk]]:
        if len(tokens) > _INLINE_HASH_TOKENS:
            return await asyncio.to_thread(_chains, tokens, spaces)
        return _chains(tokens, spaces)


def _read_heads(pipe: redis.asyncio.client.Pipeline, chains: list[list[Chunk]],
                locations: tuple[Location, ...]) -> None:
    for chain in chains:
        for location in locations:
            pipe.smembers(keys.head(location, chain[0].key))


def _candidates(chains: list[list[Chunk]], heads: list[set[str]], per_chain: int) -> list[tuple[str, list[Chunk]]]:
    found: dict[str, list[Chunk]] = {}
    for n, chain in enumerate(chains):
        for members in heads[n * per_chain : (n + 1) * per_chain]:
            for instance_id in members:
                found.setdefault(instance_id, chain)
    return sorted(found.items())


def _chains(tokens: Sequence[int], spaces: tuple[str, ...]) -> list[list[Chunk]]:
    """The chunk keys of `tokens` in every hash space the fleet registered (usually one)."""
    chains = []
    for space in spaces:
        size, _, model = space.partition(":")
        if not size.isdigit() or int(size) < 1:
            continue
        chains.append(chunk_keys(tokens, model=model, chunk_size=int(size), save_unfull_chunk=True))
    return chains


def _contiguous(instance_id: str, chain: list[Chunk], locations: tuple[Location, ...],
                held: list[list[str | None]]) -> Match | None:
    matched = 0
    found: Location | None = None
    for i, chunk in enumerate(chain):
        where = next((loc for loc, values in zip(locations, held, strict=True) if values[i] is not None), None)
        if where is None:
            break
        matched, found = chunk.end, where
    return Match(instance_id, found, matched) if found is not None else None
