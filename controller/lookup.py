"""Prefix lookup over the Redis index: which live instances hold how much of a prompt, from token 0.

Cost is flat in the number of instances. The first chunk's key names a small set of
candidate instances (the `head` sets, whose members name the ranks holding it); only those
are read. Each rank (worker) of an instance has its own index, and a tensor-parallel engine
can load no chunk that one of its ranks lacks, so each candidate is credited with the
contiguous prefix that every registered rank holds, each chunk at any of its locations.
Instances without a heartbeat are skipped. That walk runs inside Redis, one script call per hash space
and Redis node (a single Redis is one node; on a cluster the candidates are grouped by the node serving
their slot, and the nodes walk at once), never a round trip per candidate: a shared system prompt makes
every instance of a fleet a candidate.

Two round trips in the usual case: the fleet's hash spaces and locations rarely change,
so the head sets for the last ones seen are read speculatively alongside them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

from kvbus.shared import keys, redis_conn
from kvbus.shared.hashing import Chunk, LMCacheHashSpace, space_from_name
from kvbus.shared.locations import FASTEST_FIRST, Location
from kvbus.shared.pipelined import Pipelined
from kvbus.shared.resp import pack

_INLINE_HASH_TOKENS = 32_768  # longer prompts are hashed off the event loop
_EACH_AT_ONCE = 16  # candidates walked one by one while slots move, at most this many at a time

# KEYS: none (the walk builds each candidate's keys from its id), or every key of the one candidate a
# call walks alone, for the cluster's routing to follow it while its slot moves.
# ARGV: the number of locations L, the number of chunks n, the chain's n chunk keys in order, the key
# parts (keys.script_key_parts), the L locations fastest first, then the candidates in one string, a line
# each: the instance id, a tab, and the worker ids its hints name, comma-separated (one string, because
# redis-py spends microseconds on each argument and a shared prefix makes every instance a candidate).
# Every registered rank (the workers set) must hold each chunk, at any location: a registered rank that
# no hint names lacks the first chunk, so the candidate matches nothing, and a hinted rank that is not
# registered is ignored. Returns per candidate: chunks matched contiguously from the first by every
# registered rank, and the 1-based location of the last one (0 when none matched, the candidate is not
# alive or has no registered rank). When the ranks hold the last matched chunk at different locations,
# the slowest rank's is reported (each rank's fastest): a tensor-parallel load waits for its slowest rank.
# HMGETs read many chunks at once: a call per chunk cost ~9 ms per 1000 candidates. The flags let one
# call walk the candidates of many slots on one Redis Cluster node, and run on a replica.
_WALK = """#!lua flags=no-writes,allow-cross-slot-keys
local locations, chunks = tonumber(ARGV[1]), tonumber(ARGV[2])
local head, alive_, workers_, index_ = ARGV[chunks + 3], ARGV[chunks + 4], ARGV[chunks + 5], ARGV[chunks + 6]
local places = {}
for l = 1, locations do places[l] = ARGV[chunks + 6 + l] end
-- Candidates of one prompt usually hold as much of it as each other (a shared system prompt): each rank
-- reads first as many chunks as the last rank matched, and one more, then the rest only if it has them all.
local guess = chunks

-- Where each of chunks `first`..`last` is, fastest first, into `where`.
local function locate(base, first, last, where)
  for l = locations, 1, -1 do
    local found = redis.call('HMGET', base .. places[l], unpack(ARGV, 2 + first, 2 + last))
    for i = first, last do
      if found[i - first + 1] then where[i] = l end
    end
  end
end

-- The contiguous chunks one rank holds, up to `limit`, and where each is.
local function held(base, limit)
  local where, read = {}, math.min(limit, guess + 1)
  locate(base, 1, read, where)
  local matched = 0
  while matched < read and where[matched + 1] do matched = matched + 1 end
  if matched == read and read < limit then
    locate(base, read + 1, limit, where)
    while matched < limit and where[matched + 1] do matched = matched + 1 end
  end
  return matched, where
end

local function walk(bases)
  local matched, wheres = chunks, {}
  for r, base in ipairs(bases) do
    local rank_matched, where = held(base, matched)
    matched, wheres[r] = rank_matched, where
    if matched == 0 then return 0, 0 end
  end
  guess = matched
  local slowest = 0
  for _, where in ipairs(wheres) do
    if where[matched] > slowest then slowest = where[matched] end
  end
  return matched, slowest
end

-- Each registered rank's index key prefix (the location follows), or none when one lacks a hint.
local function ranks(id, hinted)
  local workers = head .. id .. workers_
  local prefix = head .. id .. index_
  if not string.find(hinted, ',', 1, true) then  -- the usual case: one rank, which must be the only one
    if redis.call('SCARD', workers) == 1 and redis.call('SISMEMBER', workers, hinted) == 1 then
      return {prefix .. hinted .. ':'}
    end
    return {}
  end
  local named = {}
  for worker in string.gmatch(hinted, '[^,]+') do named[worker] = true end
  local bases = {}
  for _, worker in ipairs(redis.call('SMEMBERS', workers)) do
    if not named[worker] then return {} end
    bases[#bases + 1] = prefix .. worker .. ':'
  end
  return bases
end

local out = {}
for id, hinted in string.gmatch(ARGV[chunks + 7 + locations], '([^\\t\\n]+)\\t([^\\n]+)') do
  local matched, last = 0, 0
  if redis.call('EXISTS', head .. id .. alive_) == 1 then
    local bases = ranks(id, hinted)
    if #bases > 0 then matched, last = walk(bases) end
  end
  out[#out + 1] = matched
  out[#out + 1] = last
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
        self._scripts = redis_conn.scripts_via(client)
        self._scope = _Scope()
        self._walk = client.register_script(_WALK)
        self.scripts = [self._walk]

    async def aclose(self) -> None:
        if isinstance(self._scripts, Pipelined):
            await self._scripts.aclose()

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
        spaces, locations, *heads = await self._members(
            [keys.HASH_SPACES, keys.LOCATIONS, *_head_keys(guess_chains, guess.locations)]
        )
        scope = _Scope(tuple(sorted(spaces)), tuple(loc for loc in FASTEST_FIRST if loc in locations))
        if scope == guess:
            return scope, guess_chains, heads
        self._scope = scope
        chains = await self._hash(tokens, scope.spaces)
        return scope, chains, await self._members(_head_keys(chains, scope.locations))

    async def _members(self, set_keys: list[str]) -> list[set[str]]:
        """Each set's members, read in one round trip."""
        if isinstance(self._scripts, Pipelined):
            return [set(members) for members in await self._scripts.batch([pack(("SMEMBERS", k)) for k in set_keys])]
        pipe = self._redis.pipeline(transaction=False)
        for key in set_keys:
            pipe.smembers(key)
        return cast(list[set[str]], await pipe.execute())

    async def _walk_chain(self, scope: _Scope, chain: _Chain, holders: list[_Holder]) -> list[Match]:
        chain_args: list[str | int] = [
            len(scope.locations),
            len(chain.chunks),
            *(c.key for c in chain.chunks),
            *keys.script_key_parts(),
            *scope.locations,
        ]
        walked = await self._walk_by_node(chain_args, holders, scope.locations)
        return [
            Match(instance_id, scope.locations[last - 1], chain.chunks[matched - 1].end)
            for (instance_id, _), (matched, last) in zip(holders, walked, strict=True)
            if matched
        ]

    async def _walk_by_node(
        self, chain_args: list[str | int], holders: list[_Holder], locations: tuple[Location, ...]
    ) -> list[tuple[int, int]]:
        """Each candidate's (matched, location): one script call per Redis node, the nodes read at once.

        On a cluster whose slots are moving (a failover, a resharding) a node may no longer hold some
        candidate's keys, and its call fails: those candidates are walked again one by one, through
        the client's own routing, which follows MOVED and ASK."""
        groups = redis_conn.by_node(self._redis, [keys.alive(instance_id) for instance_id, _ in holders])
        calls = [self._walk_group(node, chain_args, [holders[i] for i in members]) for node, members in groups]
        results: dict[int, tuple[int, int]] = {}
        for (node, members), walked in zip(groups, await asyncio.gather(*calls, return_exceptions=True), strict=True):
            if isinstance(walked, BaseException):
                if node is None or not redis_conn.slot_moved(walked):
                    raise walked
                walked = await self._walk_each(chain_args, [holders[i] for i in members], locations)
            results.update(zip(members, walked, strict=True))
        return [results[i] for i in range(len(holders))]

    async def _walk_group(
        self, node: redis_conn.Node | None, chain_args: list[str | int], holders: list[_Holder]
    ) -> list[tuple[int, int]]:
        reply = await redis_conn.run_script(self._scripts, self._walk, [], [*chain_args, _packed(holders)], node)
        return list(zip(reply[::2], reply[1::2], strict=True))

    async def _walk_each(
        self, chain_args: list[str | int], holders: list[_Holder], locations: tuple[Location, ...]
    ) -> list[tuple[int, int]]:
        walked = []
        for start in range(0, len(holders), _EACH_AT_ONCE):
            batch = holders[start : start + _EACH_AT_ONCE]
            walked += await asyncio.gather(
                *(self._walk(keys=_candidate_keys(h, locations), args=[*chain_args, _packed([h])]) for h in batch)
            )
        return [(int(reply[0]), int(reply[1])) for reply in walked]

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


def _head_keys(chains: list[_Chain], locations: tuple[Location, ...]) -> list[str]:
    return [key for chain in chains for key in chain.candidate_sets(locations)]


# A candidate instance and the ranks the head sets name for it, at any location (a plain tuple: a
# worst-case lookup builds one per instance of the fleet).
_Holder = tuple[str, tuple[int, ...]]


def _candidate_keys(holder: _Holder, locations: tuple[Location, ...]) -> list[str]:
    """Every key the walk reads for one candidate, declared so that a cluster node whose slot is moving
    redirects the call (ASK) or has it retried (TRYAGAIN) instead of failing it."""
    instance_id, ranks = holder
    indexes = [keys.index(instance_id, rank, location) for rank in ranks for location in locations]
    return [keys.alive(instance_id), keys.workers(instance_id), *indexes]


def _packed(holders: list[_Holder]) -> str:
    """The walk script's candidates argument: a line per candidate, its id, a tab, its hinted ranks."""
    return "\n".join(f"{instance_id}\t{','.join(map(str, ranks))}" for instance_id, ranks in holders)


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
