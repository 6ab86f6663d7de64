"""What the disk backend does beyond the conformance suite: restarts, damaged files, clears, tiers."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis
import torch

from kvbus.agent.agent import Agent
from kvbus.agent.backends import disk_directory
from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.backends.disk import SUFFIX, LocalDiskBackend
from kvbus.shared import keys
from kvbus.shared.config import KVBusConfig
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location
from tests.agent.test_backends import CHUNK_BYTES, SPACE, Recorder, kv
from tests.agent.test_chunk_format import documented_file
from tests.conftest import MODEL, wait_for

PROMPT = list(range(10))  # chunks of 4, 4 and 2 tokens


def chunk_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SUFFIX}"))


def file_of(directory: Path, tokens: Sequence[int], index: int) -> Path:
    return directory / f"{SPACE.chunks(tokens)[index].key}{SUFFIX}"


def test_a_restart_adopts_the_files_in_their_last_used_order(tmp_path: Path) -> None:
    first = LocalDiskBackend(SPACE, tmp_path, 1 << 20, Recorder())
    other = list(range(100, 108))
    first.store(PROMPT, kv(PROMPT, 3.0))
    first.store(other, kv(other, 4.0))
    first.retrieve(PROMPT)  # PROMPT is now the most recently used
    recorder = Recorder()
    again = LocalDiskBackend(SPACE, tmp_path, 1 << 20, recorder)
    assert len(again) == 5 and again.used_bytes == first.used_bytes
    assert recorder.ops == []  # adoption is silent: the agent's publish_all announces it
    assert [float(t.float().mean()) for t in again.retrieve(PROMPT)] == [3.0, 3.0, 3.0]
    again.publish_all()
    kind, location, entries = recorder.ops[-1]
    assert (kind, location) == ("replace", Location.DISK)
    assert {e.key for e in entries} == {c.key for c in SPACE.chunks(PROMPT) + SPACE.chunks(other)}  # type: ignore[attr-defined]
    # Eviction after the restart still takes the least recently used prompt, tail first.
    smaller = LocalDiskBackend(SPACE, tmp_path, 4 * CHUNK_BYTES, Recorder())
    assert smaller.contains(PROMPT) == 10 and smaller.contains(other) == 4
    assert len(chunk_files(tmp_path)) == 4


def test_a_restart_removes_stray_temp_files_and_files_it_cannot_use(tmp_path: Path) -> None:
    LocalDiskBackend(SPACE, tmp_path, 1 << 20).store(PROMPT, kv(PROMPT))
    (tmp_path / ".abc.x.tmp").write_bytes(b"half a chunk")
    (tmp_path / f"{'0' * 32}{SUFFIX}").write_bytes(b"not a chunk at all")
    (tmp_path / "notes.txt").write_text("not ours")
    LocalDiskBackend(HashSpace("other/model", 4), tmp_path / "other", 1 << 20).store(PROMPT, kv(PROMPT))
    for path in chunk_files(tmp_path / "other"):
        path.rename(tmp_path / path.name)  # another model's chunks: never served under this space
    backend = LocalDiskBackend(SPACE, tmp_path, 1 << 20)
    assert len(backend) == 3
    assert len(chunk_files(tmp_path)) == 3
    assert not list(tmp_path.glob("*.tmp")) and (tmp_path / "notes.txt").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "delete"])
def test_a_damaged_chunk_is_a_miss_and_leaves_the_index(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    backend = LocalDiskBackend(SPACE, tmp_path, 1 << 20, recorder)
    backend.store(PROMPT, kv(PROMPT))
    path = file_of(tmp_path, PROMPT, 1)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-1]))
    elif damage == "header":  # claims a bigger tensor than the file holds
        path.write_bytes(bytes(data).replace(b'"shape":[4,8]', b'"shape":[9,8]'))
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING, "kvbus.agent.backends"):
        assert len(backend.retrieve(PROMPT)) == 1
    assert "unusable" in caplog.text
    second = SPACE.chunks(PROMPT)[1]
    assert recorder.ops[-1] == ("evict", Location.DISK, IndexEntry(second.key, 4, False))
    assert backend.contains(PROMPT) == 4 and not path.exists()


def test_stats_keep_count_through_store_discard_clear_and_restart(tmp_path: Path) -> None:
    backend = LocalDiskBackend(SPACE, tmp_path, 1 << 20)
    backend.store(PROMPT, kv(PROMPT))
    assert backend.stats()["tokens"] == 10 and backend.stats()["chunks"] == 3
    backend.discard(SPACE.chunks(PROMPT)[2].key)
    assert backend.stats()["tokens"] == 8 and backend.stats()["bytes"] == backend.used_bytes
    assert LocalDiskBackend(SPACE, tmp_path, 1 << 20).stats()["tokens"] == 8  # adopted on restart
    backend.clear()
    assert backend.stats()["tokens"] == 0 == backend.stats()["bytes"]


def test_clear_deletes_the_files(tmp_path: Path) -> None:
    backend = LocalDiskBackend(SPACE, tmp_path, 1 << 20)
    backend.store(PROMPT, kv(PROMPT))
    backend.store([7, 7, 7], kv([7, 7, 7]))
    assert len(chunk_files(tmp_path)) == 4
    assert backend.clear() == 13
    assert chunk_files(tmp_path) == [] and len(LocalDiskBackend(SPACE, tmp_path, 1 << 20)) == 0


def test_a_store_begun_before_a_clear_does_not_land_after_it(tmp_path: Path) -> None:
    backend = LocalDiskBackend(SPACE, tmp_path, 1 << 20)
    epoch = backend.epoch
    backend.clear()
    assert backend.store(PROMPT, kv(PROMPT), epoch=epoch) == 0
    assert chunk_files(tmp_path) == [] and not list(tmp_path.glob("*.tmp"))


def test_a_chunk_file_laid_out_as_documented_is_adopted_and_served(tmp_path: Path) -> None:
    chunk = SPACE.chunks(PROMPT)[0]
    tensor = torch.arange(32, dtype=torch.float16).reshape(4, 8)
    laid_out = documented_file(tensor, key=chunk.key, space=SPACE.name, layout="", num_tokens=4, is_head=True)
    (tmp_path / f"{chunk.key}{SUFFIX}").write_bytes(laid_out)
    backend = LocalDiskBackend(SPACE, tmp_path, 1 << 20)
    assert backend.contains(PROMPT) == 4 and torch.equal(backend.retrieve(PROMPT)[0], tensor)


# The agent: memory first, the disk behind it.

TOKENS = list(range(1000, 1010))


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


def tensors(tokens: list[int], fill: float) -> list[torch.Tensor]:
    return [torch.full((2, c.num_tokens, 8), fill) for c in HashSpace(MODEL, 4).chunks(tokens)]


def index(client: redis.Redis, location: Location) -> set[str]:
    return {k.decode() for k in client.hkeys(keys.index("tiers", location))}


def test_the_agent_writes_behind_and_the_index_shows_both_locations(agent: Agent, redis_url: str) -> None:
    assert [type(b).__name__ for b in agent.backends] == ["LocalCPUBackend", "LocalDiskBackend"]
    assert agent.store(TOKENS, tensors(TOKENS, 5.0)) == 10
    assert agent.disk_writer is not None and agent.disk_writer.drain(10)
    client = redis.Redis.from_url(redis_url)
    expected = {c.key for c in agent.space.chunks(TOKENS)}
    wait_for(lambda: index(client, Location.DISK) == expected == index(client, Location.CPU), what="both indexes")
    assert client.sismember(keys.LOCATIONS, Location.DISK.value)
    client.close()


def test_retrieve_continues_from_disk_where_memory_ends(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    agent.store(TOKENS, tensors(TOKENS, 5.0))
    assert agent.disk_writer is not None and agent.disk_writer.drain(10)
    cpu, disk = agent.backends
    cpu.discard(agent.space.chunks(TOKENS)[1].key)  # memory now holds chunk 0 and, unreachably, chunk 2
    read: list[str] = []
    original = LocalDiskBackend._read
    monkeypatch.setattr(LocalDiskBackend, "_read", lambda self, key: read.append(key) or original(self, key))
    assert agent.contains(TOKENS) == 10
    found = agent.retrieve(TOKENS)
    assert [float(t.mean()) for t in found] == [5.0] * 3
    assert read == [c.key for c in agent.space.chunks(TOKENS)[1:]]  # chunk 0 came from memory alone
    cpu.clear()
    assert agent.contains(TOKENS) == 10 and len(agent.retrieve(TOKENS)) == 3
    disk.clear()
    assert agent.contains(TOKENS) == 0 and agent.retrieve(TOKENS) == []


def test_a_restarted_agent_republishes_what_its_disk_kept(config: KVBusConfig, redis_url: str) -> None:
    first = Agent(config, model=MODEL)
    first.start()
    first.store(TOKENS, tensors(TOKENS, 6.0))
    first.stop()  # writes what is queued, then leaves the index
    client = redis.Redis.from_url(redis_url)
    assert index(client, Location.DISK) == set()
    assert len(chunk_files(disk_directory(config, 0))) == 3
    again = Agent(config, model=MODEL)
    again.start()
    try:
        assert index(client, Location.DISK) == {c.key for c in again.space.chunks(TOKENS)}
        assert index(client, Location.CPU) == set()
        assert [float(t.mean()) for t in again.retrieve(TOKENS)] == [6.0] * 3
    finally:
        again.stop()
        client.close()


def test_workers_and_instances_keep_separate_directories(tmp_path: Path) -> None:
    config = KVBusConfig(lmcache_instance_id="a").with_overrides(local_disk=f"file://{tmp_path}/disk")
    assert disk_directory(config, 1) != disk_directory(config, 0)
    assert disk_directory(config, 0).is_relative_to(str(config.local_disk))
    assert os.fspath(disk_directory(config.with_overrides(lmcache_instance_id="b"), 0)) != os.fspath(
        disk_directory(config, 0)
    )
