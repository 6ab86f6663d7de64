"""LocalDiskBackend as users run it: an agent and an engine with `local_disk` set, a controller, real Redis."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis

from kvbus.agent.backends.disk import SUFFIX
from kvbus.shared import keys
from kvbus.shared.locations import Location
from tests.conftest import SEED_TEXT, SEED_TOKENS, Processes, wait_for
from tests.integration.test_engines import cached, post
from tests.integration.test_processes import lookup

INSTANCE = "lmcache_default_instance"


def disk_config(tmp_path: Path) -> dict[str, object]:
    return {"local_disk": f"file://{tmp_path}/kv/", "max_local_disk_size": 0.01}


def chunk_files(tmp_path: Path, instance: str = INSTANCE) -> list[Path]:
    return list((tmp_path / "kv" / instance / "worker-0").glob(f"*{SUFFIX}"))


def wait_for_disk_index(redis_url: str, instance: str, count: int) -> None:
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.hlen(keys.index(instance, 0, Location.DISK)) == count, what="the disk copy in the index")
    client.close()


def clear(controller: str, location: Location, instance: str = INSTANCE) -> int:
    return int(post(f"{controller}/clear", {"instance_id": instance, "location": location.value})["num_tokens"])


def test_an_agent_serves_lookup_and_clear_from_disk_across_a_restart(
    procs: Processes, redis_url: str, tmp_path: Path
) -> None:
    _, controller = procs.controller(redis_url)
    agent = procs.agent(
        redis_url, INSTANCE, "--preload-tokens", ",".join(map(str, SEED_TOKENS)), config=disk_config(tmp_path)
    )
    wait_for_disk_index(redis_url, INSTANCE, 1)
    assert lookup(controller) == {INSTANCE: ["LocalCPUBackend", 12]}  # the fastest place is named
    assert clear(controller, Location.CPU) == 12
    assert lookup(controller) == {INSTANCE: ["LocalDiskBackend", 12]}
    assert len(chunk_files(tmp_path)) == 1

    agent.send_signal(signal.SIGTERM)
    assert agent.wait(30) == 0
    assert lookup(controller) == {}
    procs.agent(redis_url, INSTANCE, config=disk_config(tmp_path))  # no preload: only what the disk kept
    assert lookup(controller) == {INSTANCE: ["LocalDiskBackend", 12]}

    assert clear(controller, Location.DISK) == 12
    assert chunk_files(tmp_path) == []
    assert lookup(controller) == {}
    assert clear(controller, Location.DISK) == 0


@pytest.mark.timeout(240)
def test_an_engine_reuses_kv_from_disk_after_its_memory_is_cleared(
    procs: Processes, redis_url: str, tmp_path: Path
) -> None:
    _, controller = procs.controller(redis_url, timeout=10)
    _, engine = procs.engine(redis_url, INSTANCE, config=disk_config(tmp_path))
    assert cached(engine, SEED_TEXT) == 0
    wait_for_disk_index(redis_url, INSTANCE, 1)
    assert clear(controller, Location.CPU) == 12
    assert cached(engine, SEED_TEXT) == 11  # loaded from disk, and back in memory since
    assert lookup(controller) == {INSTANCE: ["LocalCPUBackend", 12]}
    assert clear(controller, Location.DISK) == 12 and chunk_files(tmp_path) == []
    assert clear(controller, Location.CPU) == 12
    assert cached(engine, SEED_TEXT) == 0
