"""The tiers: stores in memory at once and on disk behind them, lookups continued from disk where memory ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from kvbus.agent.agent import Agent
from kvbus.agent.backends import disk_directory
from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.backends.disk import LocalDiskBackend
from kvbus.agent.tiers import TieredStore
from kvbus.shared import keys
from kvbus.shared.config import KVBusConfig
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location
from tests.agent.test_disk import chunk_files
from tests.conftest import MODEL, wait_for

TOKENS = list(range(1000, 1010))  # chunks of 4, 4 and 2 tokens
SPACE = HashSpace(MODEL, 4)


def tensors(tokens: list[int], fill: float) -> list[torch.Tensor]:
    return [torch.full((2, c.num_tokens, 8), fill) for c in SPACE.chunks(tokens)]


Tiers = tuple[TieredStore, LocalCPUBackend, LocalDiskBackend]


@pytest.fixture
def tiered(tmp_path: Path) -> Iterator[Tiers]:
    memory, disk = LocalCPUBackend(SPACE, 1 << 20), LocalDiskBackend(SPACE, tmp_path, 1 << 20)
    tiers = TieredStore(SPACE, [memory, disk])
    tiers.start()
    yield tiers, memory, disk
    tiers.stop()


def test_a_store_is_in_memory_at_once_and_on_disk_after_the_writer(tiered: Tiers) -> None:
    tiers, memory, disk = tiered
    stored = tensors(TOKENS, 5.0)
    assert tiers.store(TOKENS, stored) == 10 and memory.contains(TOKENS) == 10
    for tensor in stored:
        tensor.fill_(0.0)  # the caller may reuse its tensors once the store returns
    assert tiers.disk_writer is not None and tiers.disk_writer.drain(10)
    assert [float(t.mean()) for t in disk.retrieve(TOKENS)] == [5.0] * 3


def test_a_prompt_the_disk_holds_is_not_queued_again(tiered: Tiers) -> None:
    tiers, _, _ = tiered
    tiers.store(TOKENS, tensors(TOKENS, 5.0))
    assert tiers.disk_writer is not None and tiers.disk_writer.drain(10)
    tiers.disk_writer.max_pending_bytes = 0  # any submit would now be dropped and counted
    tiers.store(TOKENS, tensors(TOKENS, 5.0))
    assert tiers.disk_writer.dropped == 0


def test_retrieve_continues_from_disk_where_memory_ends(tiered: Tiers, monkeypatch: pytest.MonkeyPatch) -> None:
    tiers, memory, disk = tiered
    tiers.store(TOKENS, tensors(TOKENS, 5.0))
    assert tiers.disk_writer is not None and tiers.disk_writer.drain(10)
    memory.discard(SPACE.chunks(TOKENS)[1].key)  # memory now holds chunk 0 and, unreachably, chunk 2
    read: list[str] = []
    original = LocalDiskBackend._read
    monkeypatch.setattr(LocalDiskBackend, "_read", lambda self, key: read.append(key) or original(self, key))
    assert tiers.contains(TOKENS) == 10
    found = tiers.retrieve(TOKENS)
    assert [float(t.mean()) for t in found] == [5.0] * 3
    assert read == [c.key for c in SPACE.chunks(TOKENS)[1:]]  # chunk 0 came from memory alone
    memory.clear()
    assert tiers.contains(TOKENS) == 10 and len(tiers.retrieve(TOKENS)) == 3
    disk.clear()
    assert tiers.contains(TOKENS) == 0 and tiers.retrieve(TOKENS) == []


def test_a_disk_alone_takes_the_stores_behind(tmp_path: Path) -> None:
    disk = LocalDiskBackend(SPACE, tmp_path, 1 << 20)
    tiers = TieredStore(SPACE, [disk])
    tiers.start()
    tiers.store(TOKENS, tensors(TOKENS, 2.0))
    tiers.stop()
    assert disk.contains(TOKENS) == 10 and tiers.contains(TOKENS) == 10
    assert tiers.store(TOKENS, tensors(TOKENS, 2.0)) == 10  # held already: answered from disk


def test_memory_alone_needs_no_writer() -> None:
    tiers = TieredStore(SPACE, [LocalCPUBackend(SPACE, 1 << 20)])
    assert tiers.disk_writer is None
    assert tiers.store(TOKENS, tensors(TOKENS, 1.0)) == 10 and tiers.contains(TOKENS) == 10
    assert len(tiers.retrieve(TOKENS)) == 3


def test_a_store_needs_one_tensor_per_chunk(tmp_path: Path) -> None:
    tiers = TieredStore(SPACE, [LocalDiskBackend(SPACE, tmp_path, 1 << 20)])
    with pytest.raises(ValueError, match="3 chunks of 10 tokens need 3 tensors, got 2"):
        tiers.store(TOKENS, tensors(TOKENS[:8], 1.0))


# The tiers in an agent: both locations indexed, and the disk's chunks back after a restart.


@pytest.fixture
def config(redis_url: str, tmp_path: Path) -> KVBusConfig:
    return KVBusConfig(
        chunk_size=4,
        enable_controller=True,
        redis_url=redis_url,
        lmcache_instance_id="tiers",
        max_local_disk_size=0.001,
    ).with_overrides(local_disk=f"file://{tmp_path}/disk")


@pytest.fixture
def agent(config: KVBusConfig) -> Iterator[Agent]:
    agent = Agent(config, model=MODEL)
    agent.start()
    yield agent
    agent.stop()


def index(client: redis.Redis, location: Location) -> set[str]:
    return {k.decode() for k in client.hkeys(keys.index("tiers", 0, location))}


def test_the_agent_writes_behind_and_the_index_shows_both_locations(agent: Agent, redis_url: str) -> None:
    assert [type(b).__name__ for b in agent.backends] == ["LocalCPUBackend", "LocalDiskBackend"]
    assert agent.tiers.store(TOKENS, tensors(TOKENS, 5.0)) == 10
    assert agent.tiers.disk_writer is not None and agent.tiers.disk_writer.drain(10)
    client = redis.Redis.from_url(redis_url)
    expected = {c.key for c in agent.space.chunks(TOKENS)}
    wait_for(lambda: index(client, Location.DISK) == expected == index(client, Location.CPU), what="both indexes")
    assert client.sismember(keys.LOCATIONS, Location.DISK.value)
    client.close()


def test_a_restarted_agent_republishes_what_its_disk_kept(config: KVBusConfig, redis_url: str) -> None:
    first = Agent(config, model=MODEL)
    first.start()
    first.tiers.store(TOKENS, tensors(TOKENS, 6.0))
    first.stop()  # writes what is queued, then leaves the index
    client = redis.Redis.from_url(redis_url)
    assert index(client, Location.DISK) == set()
    assert len(chunk_files(disk_directory(config, 0))) == 3
    again = Agent(config, model=MODEL)
    again.start()
    try:
        assert index(client, Location.DISK) == {c.key for c in again.space.chunks(TOKENS)}
        assert index(client, Location.CPU) == set()
        assert [float(t.mean()) for t in again.tiers.retrieve(TOKENS)] == [6.0] * 3
    finally:
        again.stop()
        client.close()
