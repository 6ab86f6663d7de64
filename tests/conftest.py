"""Fixtures shared by every tier: fake Redis for units, real redis-server and real processes for integration."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


def wait_for_a_beat_waiting(client: redis.Redis) -> None:
    """Until some client of `client`'s Redis is blocked in a BLPOP: a heartbeat waiting its interval there."""
    wait_for(lambda: any(c["cmd"] == "blpop" for c in client.client_list()), what="a heartbeat's wait in Redis")


@dataclass
class RedisServer:
    """A redis-server of the test's own, on a free loopback port, stopped by pid."""

    port: int
    workdir: Path
    appendonly: bool = False
    cluster: bool = False
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
        if self.cluster:
            # A short node timeout: a killed master's replica takes over in about 2 s, not 15.
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "1000"]
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


def cluster_ports(count: int) -> list[int]:
    """`count` free loopback ports whose cluster bus ports (+10000) are free as well, both below the kernel's
    ephemeral range (32768 and up): a port there can be taken by any client socket between this check and
    redis-server's bind, which then never answers."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 22768)
        if port in ports:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        ports.append(port)
    return ports


@dataclass
class RedisClusterServers:
    """A Redis Cluster of the tests' own: `masters` masters with one replica each, on free loopback ports."""

    workdir: Path
    masters: int = 3
    nodes: dict[int, RedisServer] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Any one node names the cluster: kvbus finds the rest."""
        return f"redis://127.0.0.1:{next(iter(self.nodes))}/0"

    def start(self) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            pytest.skip("redis-server and redis-cli are not installed (Debian: apt-get install redis-server)")
        for port in cluster_ports(self.masters * 2):
            node = RedisServer(port, self.workdir / str(port), cluster=True)
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.start()
            self.nodes[port] = node
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.nodes)]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        wait_for(self.healthy, timeout=30, what="the cluster to cover every slot")

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster.from_url(self.url, decode_responses=True)

    def healthy(self) -> bool:
        """Every live node sees every slot served and knows `masters` masters with a replica each."""
        for node in self.live():
            with redis.Redis(port=node.port, decode_responses=True, socket_timeout=1) as client:
                info = client.cluster("info")
                if info["cluster_state"] != "ok" or int(info["cluster_size"]) != self.masters:
                    return False
        return True

    def live(self) -> list[RedisServer]:
        return [node for node in self.nodes.values() if node.process is not None]

    def master_ports(self) -> list[int]:
        """The ports of the nodes serving slots now, as the first live node sees them."""
        with redis.Redis(port=self.live()[0].port, decode_responses=True, socket_timeout=1) as client:
            lines = client.execute_command("CLUSTER", "NODES").splitlines()
        return sorted(
            int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
            for line in lines
            if "master" in line.split()[2] and "fail" not in line.split()[2] and len(line.split()) > 8
        )

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot now, as the first live node sees it."""
        slot = redis.crc.key_slot(key.encode())
        with redis.Redis(port=self.live()[0].port, decode_responses=True, socket_timeout=1) as client:
            lines = client.execute_command("CLUSTER", "NODES").splitlines()
        for fields in (line.split() for line in lines):
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for served in fields[8:]:
                low, _, high = served.partition("-")
                if not served.startswith("[") and int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no master serves slot {slot} of {key!r}")

    def kill_master(self, port: int, timeout: float = 30) -> None:
        """kill -9 the master on `port`; returns once its replica took over its slots (every live node says so)."""
        owned = self.master_ports()
        self.nodes[port].kill()
        wait_for(
            lambda: self.healthy() and port not in self.master_ports() and len(self.master_ports()) == len(owned),
            timeout=timeout,
            what=f"a replica to take over from the master on {port}",
        )

    def flush(self) -> None:
        for port in self.master_ports():
            with redis.Redis(port=port, socket_timeout=2) as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """One 3-master cluster with a replica per master, shared by the session (tests flush it)."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterServers) -> str:
    """The shared cluster, empty. A test that kills or moves nodes starts a cluster of its own."""
    redis_cluster.flush()
    return redis_cluster.url


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module that sets `REDIS_BACKENDS = ("single", "cluster")` runs each of its tests on one Redis
    and on a Redis Cluster: one suite for both deployments."""
    backends = getattr(metafunc.module, "REDIS_BACKENDS", None)
    if backends and "redis_backend" in metafunc.fixturenames:
        metafunc.parametrize("redis_backend", backends, indirect=True)


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "single"))


@pytest.fixture
def redis_url(redis_backend: str, request: pytest.FixtureRequest) -> str:
    """A real, empty Redis for this test: one node, or the shared cluster in a module run on both."""
    if redis_backend == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    server: RedisServer = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    return server.url


@pytest.fixture
def real_redis(redis_url: str, redis_backend: str) -> Iterator[redis.Redis | redis.RedisCluster]:
    factory = redis.RedisCluster if redis_backend == "cluster" else redis.Redis
    client = factory.from_url(redis_url, decode_responses=True)
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
        from kvbus.shared import keys, redis_conn

        client = redis_conn.connect(redis_url)  # a cluster client where redis_url names a cluster

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
