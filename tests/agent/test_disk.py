"""What the disk backend does beyond the conformance suite: restarts, damaged files, clears, directories."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from kvbus.agent import cli as agent_cli
from kvbus.agent.backends import disk_directory
from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.backends.disk import SUFFIX, LocalDiskBackend
from kvbus.shared.config import ConfigError, KVBusConfig
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location
from tests.agent.test_backends import CHUNK_BYTES, SPACE, Recorder, kv
from tests.agent.test_chunk_format import documented_file

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
    assert backend.stats().tokens == 10 and backend.stats().chunks == 3
    backend.discard(SPACE.chunks(PROMPT)[2].key)
    assert backend.stats().tokens == 8 and backend.stats().bytes == backend.used_bytes
    assert LocalDiskBackend(SPACE, tmp_path, 1 << 20).stats().tokens == 8  # adopted on restart
    backend.clear()
    assert backend.stats().tokens == 0 == backend.stats().bytes


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


def test_workers_and_instances_keep_separate_directories(tmp_path: Path) -> None:
    config = KVBusConfig(lmcache_instance_id="a").with_overrides(local_disk=f"file://{tmp_path}/disk")
    assert disk_directory(config, 1) != disk_directory(config, 0)
    assert disk_directory(config, 0).is_relative_to(str(config.local_disk))
    assert os.fspath(disk_directory(config.with_overrides(lmcache_instance_id="b"), 0)) != os.fspath(
        disk_directory(config, 0)
    )


def test_an_instance_id_that_climbs_out_of_local_disk_is_refused_at_config_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"enable_controller: true\nlocal_disk: {tmp_path / 'disk'}\nmax_local_disk_size: 1\n")
    assert agent_cli.main(["--config", str(path), "--instance-id", "../x"]) == 2
    refusal = capsys.readouterr().err
    assert refusal.count("\n") == 1 and "lmcache_instance_id='../x' in the command line" in refusal
    assert not (tmp_path / "x").exists()


def test_chunk_files_stay_under_local_disk_whatever_the_id_and_links_say(tmp_path: Path) -> None:
    # A config built in code skips load()'s rule; the resolved path is checked all the same.
    with pytest.raises(ConfigError, match="outside local_disk"):
        disk_directory(KVBusConfig(lmcache_instance_id="../x", local_disk=str(tmp_path / "disk")), 0)
    (tmp_path / "disk").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "disk" / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside local_disk"):
        disk_directory(KVBusConfig(lmcache_instance_id="linked", local_disk=str(tmp_path / "disk")), 0)
