"""The seed flow through `kvbus up` pointed at a Redis Cluster: it uses the cluster and starts no redis-server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvbus.shared import keys
from tests.cluster.conftest import lookup, post, seed_url
from tests.conftest import MODEL, SEED_TEXT, SEED_TOKENS, RedisClusterServers, free_port, wait_for, write_config

INSTANCE = "lmcache_default_instance"


@contextlib.contextmanager
def running_up(tmp_path: Path, redis_url: str) -> Iterator[tuple[subprocess.Popen[bytes], Path, str, str]]:
    """`kvbus up --redis-url <cluster>` on free ports, once it says it is up; stopped (SIGTERM) at the end."""
    engine_port, controller_port = free_port(), free_port()
    config = write_config(tmp_path / "up.yaml", heartbeat_interval=0.5, heartbeat_ttl=5)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LMCACHE_CONFIG_FILE", None)
    env.pop("LMCACHE_REDIS_URL", None)
    command = [sys.executable, "-m", "kvbus", "up", "--config", str(config), "--redis-url", redis_url]
    command += ["--data-dir", str(tmp_path / "data"), "--engine-port", str(engine_port)]
    command += ["--controller-port", str(controller_port)]
    out = tmp_path / "up.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: "kvbus is up" in out.read_text() or proc.poll() is not None, timeout=90, what="kvbus up")
            assert "kvbus is up" in out.read_text(), out.read_text()
            yield proc, out, f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{controller_port}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # up stops its parts; a SIGKILL would orphan them
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def children(pid: int) -> list[str]:
    """The command lines of `pid`'s child processes."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append((stat.parent / "cmdline").read_text().replace("\0", " "))
    return found


@pytest.mark.timeout(240)
@pytest.mark.parametrize("form", ["one node", "seed list"])
def test_the_seed_flow_through_kvbus_up_on_a_cluster(
    tmp_path: Path, cluster_url: str, redis_cluster: RedisClusterServers, form: str
) -> None:
    url = cluster_url if form == "one node" else seed_url(redis_cluster)
    with running_up(tmp_path, url) as (proc, out, engine, controller):
        banner = out.read_text()
        assert "already running; using it" in banner and "started redis-server" not in banner, banner
        parts = children(proc.pid)
        assert len(parts) == 2 and not any("redis-server" in line for line in parts), parts

        completion = post(engine, "/v1/completions", {"model": MODEL, "prompt": SEED_TEXT, "max_tokens": 10})
        assert completion["usage"]["prompt_tokens"] == 12
        assert lookup(controller, SEED_TOKENS) == {INSTANCE: ["LocalCPUBackend", 12]}
        cleared = post(controller, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"})
        assert cleared["num_tokens"] == 12 and cleared["event_id"].startswith("Clear")
        assert lookup(controller, SEED_TOKENS) == {}
        # The instance's keys are where the cluster puts them: on the master serving its hash tag.
        owner = redis_cluster.master_of(keys.alive(INSTANCE))
        with redis.Redis(port=owner, decode_responses=True) as node:
            assert node.exists(keys.alive(INSTANCE), keys.info(INSTANCE)) == 2


def test_kvbus_up_starts_no_redis_for_a_cluster_that_does_not_answer(tmp_path: Path) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/0"
    result = subprocess.run(
        [sys.executable, "-m", "kvbus", "up", "--redis-url", nowhere, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no node of the Redis Cluster at" in result.stdout and "never a cluster" in result.stdout
    assert "starting" not in result.stdout and not (tmp_path / "data").exists()
