"""Prefix lookup (lookup.py) against a real redis-server: over HTTP with the app in process, and
`PrefixIndex.lookup` called directly where its hash spaces, liveness checks and speculation show.

(fakeredis's asyncio client cannot cancel a blocked XREAD that a thread's write has
touched, which hangs the app's shutdown; real Redis has no such problem.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import redis
import redis.asyncio
from starlette.testclient import TestClient

from kvbus.agent.agent import Agent
from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.index_writer import IndexWriter
from kvbus.agent.registration import Registration, WorkerAddress
from kvbus.agent.synthetic import synthetic_kv
from kvbus.controller.lookup import Match, PrefixIndex
from kvbus.shared import keys, redis_conn
from kvbus.shared.config import KVBusConfig
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import FASTEST_FIRST, Location
from tests.conftest import MODEL, SEED_TOKENS

# One suite for both deployments: each test runs on one Redis and on a 3-master Redis Cluster.
REDIS_BACKENDS = ("single", "cluster")

BASE = KVBusConfig(
    enable_controller=True, command_timeout=0.5, heartbeat_interval=0.1, heartbeat_ttl=30, max_lookup_tokens=4096
)
SPACE = HashSpace(MODEL, 256)
QWEN = HashSpace("Qwen/Qwen3-8B", 256)
PROMPT = list(range(1000, 2000))  # 3 full chunks and a 232-token tail


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


def hold(
    url: str,
    instance_id: str,
    *prompts: list[int],
    space: HashSpace = SPACE,
    alive: bool = True,
    worker_id: int = 0,
) -> LocalCPUBackend:
    """Rank `worker_id` of an instance, holding `prompts`, registered and indexed, with no consumer thread."""
    redis_client = redis_conn.connect(url)
    Registration(
        redis_client,
        instance_id=instance_id,
        worker_id=worker_id,
        space=space,
        locations=[Location.CPU],
        address=WorkerAddress("127.0.0.1", None, None),
        ttl_s=60,
    ).register()
    writer = IndexWriter(redis_client, instance_id, worker_id)
    backend = LocalCPUBackend(space, 1 << 30, writer)
    for prompt in prompts:
        backend.store(prompt, synthetic_kv(space, prompt))
    writer.flush()
    if not alive:
        redis_client.delete(keys.alive(instance_id))
    return backend


def place(
    url: str, instance_id: str, tokens: list[int], places: Sequence[tuple[Location, ...]], worker_id: int = 0
) -> None:
    """Rank `worker_id` of an instance, whose index has chunk n of `tokens` at each location of `places[n]`, and
    no backend behind it."""
    redis_client = redis_conn.connect(url)
    Registration(
        redis_client,
        instance_id=instance_id,
        worker_id=worker_id,
        space=SPACE,
        locations=[loc for loc in FASTEST_FIRST if any(loc in where for where in places)],
        address=WorkerAddress("127.0.0.1", None, None),
        ttl_s=60,
    ).register()
    writer = IndexWriter(redis_client, instance_id, worker_id)
    for chunk, where in zip(SPACE.chunks(tokens), places, strict=False):
        for location in where:
            writer.admitted(location, IndexEntry(chunk.key, chunk.num_tokens, chunk.start == 0))
    writer.flush()


def lookup(client: TestClient, tokens: list[int]) -> dict[str, list[object]]:
    response = client.post("/lookup", json={"tokens": tokens})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["event_id"].startswith("Lookup")
    return body["layout_info"]  # type: ignore[no-any-return]


def test_the_seed_flow(client: TestClient, agent: Agent) -> None:
    assert lookup(client, SEED_TOKENS) == {}
    agent.tiers.store(SEED_TOKENS, synthetic_kv(agent.space, SEED_TOKENS))
    agent.index.flush()
    assert lookup(client, SEED_TOKENS) == {"lmcache_default_instance": ["LocalCPUBackend", 12]}
    response = client.post("/clear", json={"instance_id": "lmcache_default_instance", "location": "LocalCPUBackend"})
    assert response.status_code == 200
    assert response.json()["num_tokens"] == 12
    assert response.json()["event_id"].startswith("Clear")
    assert lookup(client, SEED_TOKENS) == {}
    assert agent.tiers.contains(SEED_TOKENS) == 0


def test_every_holder_is_credited_with_its_own_contiguous_prefix(
    client: TestClient,
    redis_url: str,
) -> None:
    hold(redis_url, "full", PROMPT)
    hold(redis_url, "half", PROMPT[:512])
    holed = hold(redis_url, "holed", PROMPT)
    holed.discard(SPACE.chunks(PROMPT)[1].key)
    holed.listener.flush()  # type: ignore[union-attr]
    hold(redis_url, "other", list(range(5000, 6000)))
    hold(redis_url, "dead", PROMPT, alive=False)
    hold(redis_url, "suffix-only", [7, 7, 7] + PROMPT[256:])
    layout = lookup(client, PROMPT)
    assert layout == {
        "full": ["LocalCPUBackend", 1000],
        "half": ["LocalCPUBackend", 512],
        "holed": ["LocalCPUBackend", 256],
    }
    assert list(layout) == ["full", "half", "holed"]  # longest first
    assert lookup(client, PROMPT[:300]) == {
        "full": ["LocalCPUBackend", 256],
        "half": ["LocalCPUBackend", 256],
        "holed": ["LocalCPUBackend", 256],
    }


def test_models_are_kept_apart_but_both_reported(client: TestClient, redis_url: str) -> None:
    hold(redis_url, "llama", SEED_TOKENS)
    hold(redis_url, "qwen", SEED_TOKENS[:8], space=QWEN)
    assert lookup(client, SEED_TOKENS) == {"llama": ["LocalCPUBackend", 12]}
    assert lookup(client, SEED_TOKENS[:8]) == {"qwen": ["LocalCPUBackend", 8]}


def test_a_prefix_spread_over_locations_counts_whole_and_names_the_last_chunks_place(
    client: TestClient,
    redis_url: str,
) -> None:
    place(redis_url, "tiered", PROMPT, [(Location.CPU, Location.GPU), (Location.CPU,), (Location.DISK,)])  # not chunk 3
    assert lookup(client, PROMPT) == {"tiered": ["LocalDiskBackend", 768]}
    assert lookup(client, PROMPT[:256]) == {"tiered": ["LocalGPUBackend", 256]}


async def _lookups(url: str, *prompts: list[int]) -> list[list[Match]]:
    client = await redis_conn.connect_async(url)
    index = PrefixIndex(client)
    try:
        return [await index.lookup(prompt) for prompt in prompts]
    finally:
        await index.aclose()
        await client.aclose()


def test_every_registered_hash_space_is_walked_and_a_stray_entry_is_ignored(
    redis_url: str, real_redis: redis.Redis
) -> None:
    hold(redis_url, "llama", PROMPT)
    hold(redis_url, "qwen", PROMPT[:512], space=QWEN)
    hold(redis_url, "small-chunks", PROMPT[:384], space=HashSpace(MODEL, 128))
    real_redis.sadd(keys.HASH_SPACES, "not-a-hash-space")
    [found] = asyncio.run(_lookups(redis_url, PROMPT))
    assert found == [
        Match("llama", Location.CPU, 1000),
        Match("qwen", Location.CPU, 512),
        Match("small-chunks", Location.CPU, 384),
    ]


def test_a_candidate_without_a_heartbeat_is_skipped_until_it_beats_again(
    redis_url: str, real_redis: redis.Redis
) -> None:
    hold(redis_url, "live", PROMPT)
    hold(redis_url, "dead", PROMPT[:512], alive=False)
    # Both are candidates: the head set is only a hint, and liveness is checked in the walk.
    assert real_redis.smembers(keys.head(Location.CPU, SPACE.chunks(PROMPT)[0].key)) == {"0:live", "0:dead"}
    [skipped] = asyncio.run(_lookups(redis_url, PROMPT))
    assert skipped == [Match("live", Location.CPU, 1000)]
    real_redis.set(keys.alive("dead"), 0, ex=60)
    [back] = asyncio.run(_lookups(redis_url, PROMPT))
    assert back == [Match("live", Location.CPU, 1000), Match("dead", Location.CPU, 512)]


def test_the_scope_guessed_from_the_last_lookup_is_checked_and_replaced_when_it_changed(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold(redis_url, "llama", PROMPT)

    async def scenario() -> list[tuple[int, set[Match]]]:
        client = await redis_conn.connect_async(redis_url)
        index = PrefixIndex(client)
        pipelines: list[list[str]] = []  # each round trip of set reads
        original = index._members

        async def counted(set_keys: list[str]) -> list[set[str]]:
            pipelines.append(set_keys)
            return await original(set_keys)

        monkeypatch.setattr(index, "_members", counted)
        rounds = []

        async def look() -> None:
            before = len(pipelines)
            found = set(await index.lookup(PROMPT))
            rounds.append((len(pipelines) - before, found))

        try:
            await look()  # nothing guessed yet: the scope, then the head sets
            await look()  # the same scope: its head sets come with it
            hold(redis_url, "qwen", PROMPT, space=QWEN)  # a new hash space
            await look()
            await look()
            place(redis_url, "disked", PROMPT, [(Location.DISK,)])  # a new location
            await look()
            await look()
        finally:
            await index.aclose()
            await client.aclose()
        return rounds

    llama, qwen, disked = (
        Match("llama", Location.CPU, 1000),
        Match("qwen", Location.CPU, 1000),
        Match("disked", Location.DISK, 256),
    )
    assert asyncio.run(scenario()) == [
        (2, {llama}),
        (1, {llama}),
        (2, {llama, qwen}),
        (1, {llama, qwen}),
        (2, {llama, qwen, disked}),
        (1, {llama, qwen, disked}),
    ]


LONG = list(range(10_000, 10_000 + 8192))  # 32 full chunks


def test_an_instance_is_credited_only_with_what_every_rank_holds(redis_url: str, real_redis: redis.Redis) -> None:
    """Issue 9: a TP engine can load no chunk one of its ranks lacks."""
    place(redis_url, "tp", LONG, [(Location.CPU,)] * 32, worker_id=0)
    place(redis_url, "tp", LONG, [], worker_id=1)  # registered, holds nothing
    [nothing] = asyncio.run(_lookups(redis_url, LONG))
    assert nothing == []
    place(redis_url, "tp", LONG, [(Location.CPU,)] * 8, worker_id=1)  # rank 1 now holds the first 8 chunks
    [eight] = asyncio.run(_lookups(redis_url, LONG))
    assert eight == [Match("tp", Location.CPU, 8 * 256)]
    place(redis_url, "tp", LONG, [(Location.CPU,)] * 32, worker_id=1)
    [full] = asyncio.run(_lookups(redis_url, LONG))
    assert full == [Match("tp", Location.CPU, 8192)]
    # A third rank, holding the first 10 chunks, two of them at another location than its peers: any counts.
    place(redis_url, "tp", LONG, [(Location.CPU,)] * 8 + [(Location.DISK,)] * 2, worker_id=2)
    [mixed] = asyncio.run(_lookups(redis_url, LONG))
    assert mixed == [Match("tp", Location.DISK, 10 * 256)]
    assert real_redis.hlen(keys.index("tp", 0, Location.CPU)) == 32  # each rank's index is its own


def test_the_slowest_rank_s_location_of_the_last_matched_chunk_is_reported(redis_url: str) -> None:
    place(redis_url, "tp", PROMPT, [(Location.GPU, Location.CPU)] * 4, worker_id=0)
    place(redis_url, "tp", PROMPT, [(Location.CPU,), (Location.CPU, Location.GPU), (Location.GPU,)], worker_id=1)
    found, first = asyncio.run(_lookups(redis_url, PROMPT, PROMPT[:256]))
    # Rank 1 lacks chunk 3. Chunk 2 is on both ranks' GPU; chunk 0 on rank 0's GPU and rank 1's CPU.
    assert found == [Match("tp", Location.GPU, 768)]
    assert first == [Match("tp", Location.CPU, 256)]
    place(redis_url, "tp", PROMPT, [(Location.DISK,)] * 3, worker_id=2)
    [slowest] = asyncio.run(_lookups(redis_url, PROMPT))
    assert slowest == [Match("tp", Location.DISK, 768)]


def test_a_rank_s_withdrawn_hint_leaves_the_others_and_a_rank_that_leaves_is_not_waited_for(
    redis_url: str, real_redis: redis.Redis
) -> None:
    hold(redis_url, "tp", PROMPT, worker_id=0)
    rank1 = hold(redis_url, "tp", PROMPT, worker_id=1)
    head = keys.head(Location.CPU, SPACE.chunks(PROMPT)[0].key)
    assert real_redis.smembers(head) == {keys.head_member("tp", 0), keys.head_member("tp", 1)}
    assert asyncio.run(_lookups(redis_url, PROMPT)) == [[Match("tp", Location.CPU, 1000)]]
    rank1.clear()
    assert isinstance(rank1.listener, IndexWriter)
    rank1.listener.drain()
    assert real_redis.smembers(head) == {keys.head_member("tp", 0)}  # rank 0's hint stays
    assert real_redis.hlen(keys.index("tp", 0, Location.CPU)) == 4
    assert asyncio.run(_lookups(redis_url, PROMPT)) == [[]]  # registered rank 1 holds nothing
    Registration(
        real_redis,
        instance_id="tp",
        worker_id=1,
        space=SPACE,
        locations=[Location.CPU],
        address=WorkerAddress("127.0.0.1", None, None),
        ttl_s=60,
    ).deregister()
    assert asyncio.run(_lookups(redis_url, PROMPT)) == [[Match("tp", Location.CPU, 1000)]]


def test_head_members_name_the_ranks_to_walk_and_others_are_ignored(redis_url: str, real_redis: redis.Redis) -> None:
    hold(redis_url, "tp", PROMPT, worker_id=0)
    hold(redis_url, "tp", PROMPT, worker_id=1)
    head = keys.head(Location.CPU, SPACE.chunks(PROMPT)[0].key)
    # A rank's index that no member names is not read: its rank counts as lacking the first chunk.
    real_redis.srem(head, keys.head_member("tp", 1))
    assert asyncio.run(_lookups(redis_url, PROMPT)) == [[]]
    real_redis.sadd(head, keys.head_member("tp", 1))
    # A member for a rank that is not registered (a stale hint) is ignored, and so is a member of any
    # other form, such as a bare instance id left by an older kvbus.
    real_redis.sadd(head, keys.head_member("tp", 7), "tp", "x:tp", ":tp", "3:")
    assert asyncio.run(_lookups(redis_url, PROMPT)) == [[Match("tp", Location.CPU, 1000)]]
    # An instance with no registered rank left matches nothing.
    real_redis.delete(keys.workers("tp"))
    assert asyncio.run(_lookups(redis_url, PROMPT)) == [[]]


def test_head_members_round_trip() -> None:
    assert keys.head_holder(keys.head_member("a:b", 12)) == ("a:b", 12)
    for member in ("tp", "x:tp", ":tp", "3:", "٣:tp"):
        assert keys.head_holder(member) is None


def test_over_http_real_ranks_are_credited_with_what_both_hold(client: TestClient, ranks: list[Agent]) -> None:
    ranks[0].tiers.store(PROMPT, synthetic_kv(ranks[0].space, PROMPT))
    ranks[0].index.flush()
    assert lookup(client, PROMPT) == {}  # rank 1 holds none of it: the engine could load nothing
    ranks[1].tiers.store(PROMPT[:512], synthetic_kv(ranks[1].space, PROMPT[:512]))
    ranks[1].index.flush()
    assert lookup(client, PROMPT) == {"lmcache_default_instance": ["LocalCPUBackend", 512]}
