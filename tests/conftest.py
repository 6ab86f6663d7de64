"""Fixtures shared by every tier: fake Redis for units, real redis-server and real processes for integration."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fakeredis
import httpx
import pytest
import redis
import yaml

SEED_TEXT = "Explain the significance of KV cache in language models."
SEED_TOKENS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - the thing waited for may not be up yet
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class RedisServer:
    """A redis-server of the test's own, on a free loopback port, stopped by pid."""

    port: int
    workdir: Path
    appendonly: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            str(self.workdir),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_for(client.ping, what=f"redis-server on {self.port}")
        client.close()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers on them, as on a stalled Redis."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def stallable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, since the test stalls it; never left stopped after the test."""
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    if server.process is not None:
        server.resume()
    server.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A real, empty Redis for this test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def real_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def fake_redis(fake_server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fake_server, decode_responses=True)


def write_config(path: Path, **values: object) -> Path:
    base: dict[str, object] = {
        "chunk_size": 256,
        "local_cpu": True,
        "max_local_cpu_size": 1,
        "enable_controller": True,
        "lmcache_instance_id": "lmcache_default_instance",
        "heartbeat_interval": 0.2,
        "heartbeat_ttl": 1.5,
        "command_timeout": 2.0,
    }
    base.update(values)
    path.write_text(yaml.safe_dump(base))
    return path


class Processes:
    """kvbus controller, agent and engine processes started by a test; all are killed at its end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self._procs: list[subprocess.Popen[bytes]] = []
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._env.pop("LMCACHE_CONFIG_FILE", None)

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / log_name, "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvbus", *args], stdout=log, stderr=subprocess.STDOUT, env=self._env
        )
        self._procs.append(proc)
        return proc

    def controller(self, redis_url: str, *, timeout: float = 2.0) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        proc = self._spawn(
            ["controller", "--port", str(port), "--redis-url", redis_url, "--command-timeout", str(timeout)],
            f"controller-{port}.log",
        )
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, what="controller /healthz")
        return proc, base

    def agent(
        self,
        redis_url: str,
        instance_id: str = "lmcache_default_instance",
        *extra: str,
        config: dict[str, object] | None = None,
    ) -> subprocess.Popen[bytes]:
        path = write_config(
            self.tmp / f"{instance_id}.yaml", redis_url=redis_url, lmcache_instance_id=instance_id, **(config or {})
        )
        proc = self._spawn(["agent", "--config", str(path), *extra], f"agent-{instance_id}.log")
        client = redis.Redis.from_url(redis_url)
        from kvbus.shared import keys

        wait_for(
            lambda: client.exists(keys.alive(instance_id)) and client.xinfo_groups(keys.commands(instance_id)),
            what=f"agent {instance_id} to register",
        )
        client.close()
        return proc

    def engine(
        self, redis_url: str, instance_id: str = "lmcache_default_instance", config: dict[str, object] | None = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        """A reference engine (`kvbus engine`) on a free port, once it answers /health."""
        path = write_config(
            self.tmp / f"engine-{instance_id}.yaml",
            redis_url=redis_url,
            lmcache_instance_id=instance_id,
            **(config or {}),
        )
        port = free_port()
        proc = self._spawn(["engine", "--config", str(path), "--port", str(port)], f"engine-{instance_id}.log")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/health").status_code == 200, timeout=60, what=f"engine {instance_id}")
        return proc, base

    def log(self, name: str) -> str:
        return (self.tmp / name).read_text()

    def stop_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    yield processes
    processes.stop_all()
