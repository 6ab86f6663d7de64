"""Prefix lookup over the Redis index: which live instances hold how much of a prompt, from token 0.

Cost is flat in the number of instances. The first chunk's key names a small set of
candidate instances (the `head` sets, whose members name the ranks holding it); only those
are read. Each rank (worker) of an instance has its own index, and a tensor-parallel engine
can load no chunk that one of its ranks lacks, so each candidate is credited with the
contiguous prefix that every registered rank holds, each chunk at any of its locations.
Instances without a heartbeat are skipped. That walk runs inside Redis, one script call per hash space: when a shared
system prompt makes every instance a candidate, 1000 candidates cost ~8 ms instead of the
~170 ms that one HMGET per candidate costs in redis-py. (A script may only touch keys of
one Redis node; kvbus talks to a single Redis today, and its per-instance keys are
hash-tagged so that a cluster version can group candidates by slot.)

Two round trips in the usual case: the fleet's hash spaces and locations rarely change,
so the head sets for the last ones seen are read speculatively alongside them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from kvbus.shared import keys, redis_conn
from kvbus.shared.hashing import Chunk, LMCacheHashSpace, space_from_name
from kvbus.shared.locations import FASTEST_FIRST, Location

_INLINE_HASH_TOKENS = 32_768  # longer prompts are hashed off the event loop

# KEYS: per candidate, its alive key, its workers set, then for each rank its head hints name
# (the hinted ranks), that rank's index key at each location, fastest first.
# ARGV: the number of locations L, the number of chunks n, the chain's n chunk keys in order,
# then per candidate the number of hinted ranks and their worker ids, in the order of KEYS.
# Every registered rank (SMEMBERS of the workers set) must hold each chunk, at any location: a
# registered rank that no hint names lacks the first chunk, so the candidate matches nothing, and a
# hinted rank that is not registered is ignored. Returns per candidate: chunks matched contiguously
# from the first by every registered rank, and the 1-based location of the last one (0 when none
# matched, the candidate is not alive or has no registered rank). When the ranks hold the last
# matched chunk at different locations, the slowest rank's is reported (each rank's fastest):
# a tensor-parallel load waits for its slowest rank.
_WALK = """
local locations, chunks = tonumber(ARGV[1]), tonumber(ARGV[2])

local function walk(bases)
  local matched, last = 0, 0
  for i = 1, chunks do
    local slowest = 0
    for _, base in ipairs(bases) do
      local found = 0
      for l = 1, locations do
        if redis.call('HEXISTS', KEYS[base + l], ARGV[i + 2]) == 1 then found = l break end
      end
      if found == 0 then return matched, last end
      if found > slowest then slowest = found end
    end
    matched, last = i, slowest
  end
  return matched, last
end

local function ranks(k, hinted, a, registered)
  if hinted == 1 then  -- the usual case: one rank named, which must be the only one registered
    if #registered == 1 and registered[1] == ARGV[a + 1] then return {k + 1} end
    return {}
  end
  local base = {}
  for r = 1, hinted do base[ARGV[a + r]] = k + 1 + (r - 1) * locations end
  local bases = {}
  for _, worker in ipairs(registered) do
    if base[worker] == nil then return {} end
    bases[#bases + 1] = base[worker]
  end
  return bases
end

local out = {}
local k, a = 1, chunks + 3
while k <= #KEYS do
  local hinted = tonumber(ARGV[a])
  local matched, last = 0, 0
  if redis.call('EXISTS', KEYS[k]) == 1 then
    local bases = ranks(k, hinted, a, redis.call('SMEMBERS', KEYS[k + 1]))
    if #bases > 0 then matched, last = walk(bases) end
  end
  out[#out + 1] = matched
  out[#out + 1] = last
  k = k + 2 + hinted * locations
  a = a + 1 + hinted
end
return out
"""


@dataclass(frozen=True)
class Match:
    instance_id: str
    # Where the last matched chunk is, fastest first when it is in several; when the ranks hold it
    # at different locations, the slowest rank's (the walk script says why).
    location: Location
    num_tokens: int


@dataclass(frozen=True)
class _Scope:
    """What every lookup hashes with and reads from; a speculation hint, never trusted unchecked."""

    spaces: tuple[str, ...] = ()
    locations: tuple[Location, ...] = ()


class PrefixIndex:
    def __init__(self, client: redis_conn.AsyncClient) -> None:
        self._redis = client
        self._scope = _Scope()
        self._walk = client.register_script(_WALK)

    async def lookup(self, tokens: Sequence[int]) -> list[Match]:
        """Every live instance whose registered ranks all hold a prefix of `tokens`, longest first."""
        scope, chains, heads = await self._candidate_heads(tokens)
        matches = []
        for chain, holders in _candidates(chains, heads, scope.locations):
            matches += await self._walk_chain(scope, chain, holders)
        matches.sort(key=lambda m: (-m.num_tokens, m.instance_id))
        return matches

    async def _candidate_heads(self, tokens: Sequence[int]) -> tuple[_Scope, list[_Chain], list[set[str]]]:
        """The fleet's scope, the prompt's chains in it, and the head sets of each chain's first chunk.

        The head sets for the last scope seen are read along with the scope; only a changed
        scope costs a second round trip.
        """
        guess = self._scope
        guess_chains = await self._hash(tokens, guess.spaces)
        pipe = self._redis.pipeline(transaction=False)
        pipe.smembers(keys.HASH_SPACES)
        pipe.smembers(keys.LOCATIONS)
        _read_heads(pipe, guess_chains, guess.locations)
        spaces, locations, *heads = await pipe.execute()
        scope = _Scope(tuple(sorted(spaces)), tuple(loc for loc in FASTEST_FIRST if loc in locations))
        if scope == guess:
            return scope, guess_chains, heads
        self._scope = scope
        chains = await self._hash(tokens, scope.spaces)
        pipe = self._redis.pipeline(transaction=False)
        _read_heads(pipe, chains, scope.locations)
        return scope, chains, await pipe.execute()

    async def _walk_chain(self, scope: _Scope, chain: _Chain, holders: list[_Holder]) -> list[Match]:
        walk_keys: list[str] = []
        rank_args: list[int] = []
        for instance_id, ranks in holders:
            walk_keys += (keys.alive(instance_id), keys.workers(instance_id))
            walk_keys += (keys.index(instance_id, rank, loc) for rank in ranks for loc in scope.locations)
            rank_args += (len(ranks), *ranks)
        walked = await self._walk(
            keys=walk_keys, args=[len(scope.locations), len(chain.chunks), *(c.key for c in chain.chunks), *rank_args]
        )
        return [
            Match(instance_id, scope.locations[last - 1], chain.chunks[matched - 1].end)
            for (instance_id, _), matched, last in zip(holders, walked[::2], walked[1::2], strict=True)
            if matched
        ]

    @staticmethod
    async def _hash(tokens: Sequence[int], spaces: tuple[str, ...]) -> list[_Chain]:
        if len(tokens) > _INLINE_HASH_TOKENS:
            return await asyncio.to_thread(_chains, tokens, spaces)
        return _chains(tokens, spaces)


class _Chain(NamedTuple):
    """A prompt's chunk keys in one hash space, and whether that space keeps head hints (LMCache's does not)."""

    chunks: list[Chunk]
    space: str
    hinted: bool

    def candidate_sets(self, locations: tuple[Location, ...]) -> list[str]:
        """The sets whose members (`keys.head_member`) name the ranks to walk for this chain."""
        if self.hinted:
            return [keys.head(location, self.chunks[0].key) for location in locations]
        return [keys.space_instances(self.space)]


def _read_heads(pipe: redis_conn.AsyncPipeline, chains: list[_Chain], locations: tuple[Location, ...]) -> None:
    for chain in chains:
        for key in chain.candidate_sets(locations):
            pipe.smembers(key)


# A candidate instance and the ranks the head sets name for it, at any location (a plain tuple: a
# worst-case lookup builds one per instance of the fleet).
_Holder = tuple[str, tuple[int, ...]]


def _candidates(
    chains: list[_Chain], heads: list[set[str]], locations: tuple[Location, ...]
) -> list[tuple[_Chain, list[_Holder]]]:
    """Each chain with the instances its candidate sets name; an instance goes with its first chain."""
    seen: set[str] = set()
    grouped = []
    read = 0
    for chain in chains:
        count = len(chain.candidate_sets(locations))
        ranks = _ranks(set().union(*heads[read : read + count]))
        read += count
        fresh = sorted(ranks.keys() - seen)
        if fresh:
            grouped.append((chain, [(i, tuple(sorted(ranks[i]))) for i in fresh]))
            seen.update(fresh)
    return grouped


def _ranks(members: set[str]) -> dict[str, set[int]]:
    """Head set members as instance id -> the ranks named; a member of another form is skipped."""
    ranks: dict[str, set[int]] = {}
    for member in members:
        holder = keys.head_holder(member)
        if holder is not None:
            ranks.setdefault(holder[0], set()).add(holder[1])
    return ranks


def _chains(tokens: Sequence[int], names: tuple[str, ...]) -> list[_Chain]:
    """The chunk keys of `tokens` in every hash space the fleet registered (usually one).

    A lookup hashes any trailing partial chunk too: agents that do not store one simply miss it.
    """
    chains = []
    for name in names:
        with contextlib.suppress(ValueError):  # a stray entry must not fail every lookup
            space = space_from_name(name)
            chunks = space.chunks(tokens)
            if chunks:
                chains.append(_Chain(chunks, name, hinted=not isinstance(space, LMCacheHashSpace)))
    return chains
