"""What every benchmark shares: its own redis-server, controller and agent processes, synthetic
prompts and index entries, percentiles, per-process CPU time, and the figure table.

Every process a benchmark starts is its own (a redis-server on a free loopback port, never the
one on 6379) and is stopped by pid when the benchmark ends, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import redis
import torch
import yaml

from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.index_writer import IndexWriter, Taken
from kvbus.agent.own_connection import read_replies
from kvbus.agent.registration import Registration, WorkerAddress
from kvbus.shared import keys, redis_conn
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CHUNK_SIZE = 256
PROMPT_TOKENS = 8192  # 32 chunks of 256
VOCAB = 128_256
SPACE = HashSpace(MODEL, CHUNK_SIZE)
CPU = Location.CPU
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- figures and statistics


@dataclass
class Figure:
    """One reported number (or pair), with the conditions it was measured under and its target."""

    name: str
    conditions: str
    measured: str
    target: str = "-"
    met: bool | None = None  # None: context only, no target
    data: dict[str, float] = field(default_factory=dict)


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated between closest ranks."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def print_table(figures: Sequence[Figure]) -> None:
    columns = ("figure", "conditions", "measured", "target", "")
    rows = [
        (f.name, f.conditions, f.measured, f.target, "-" if f.met is None else ("ok" if f.met else "MISS"))
        for f in figures
    ]
    widths = [max(len(str(r[i])) for r in (columns, *rows)) for i in range(len(columns))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    for row in (columns, tuple("-" * w for w in widths), *rows):
        print(line.format(*row).rstrip())


def write_json(path: str, figures: Sequence[Figure], quick: bool) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(
        json.dumps(
            {
                "quick": quick,
                "host_cpus": os.cpu_count(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "figures": [asdict(f) for f in figures],
            },
            indent=2,
        )
    )


def main(run: Callable[[bool], list[Figure]], description: str | None) -> None:
    """The command line every benchmark script shares: --quick and --json PATH."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer samples and smaller data, for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args()
    figures = run(args.quick)
    print()
    print_table(figures)
    if args.json:
        write_json(args.json, figures, args.quick)


def note(message: str) -> None:
    """Progress on stderr, so the table on stdout stays clean."""
    print(f"  .. {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> float:
    """CPU time the process's live threads have used so far, to the nanosecond (their schedstat): for idle
    shares, which `cpu_seconds`'s 10 ms ticks cannot resolve. A thread that ends between two readings
    drops out of the second: only for processes whose threads live as long as they do."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in ticks: the box is shared, so say how busy."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    return (after[0] - before[0]) / max(after[1] - before[1], 1)


def _wait(
    predicate: Callable[[], object], proc: subprocess.Popen[bytes], what: str, log: Path | None, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready\n{tail}")
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGTERM the process by pid, SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _env() -> dict[str, str]:
    """Our environment minus LMCACHE_* variables, which would override the configs we write."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}, "PYTHONUNBUFFERED": "1"}


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    url: str = ""  # where to reach it, for servers

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[Proc]:
    """A redis-server of our own on a free loopback port, without persistence; its `url` is a redis:// URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH")
    for attempt in range(3):  # a free port can be taken between probing and binding
        port = free_port()
        log = workdir / f"redis-{port}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(workdir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        probe = redis.Redis(port=port, socket_connect_timeout=0.5)
        try:
            _wait(probe.ping, proc, f"redis-server on port {port}", log)
        except (RuntimeError, TimeoutError):
            stop(proc)
            if attempt == 2:
                raise
            continue
        finally:
            probe.close()
        try:
            yield Proc(proc, f"redis://127.0.0.1:{port}/0")
        finally:
            stop(proc)
        return


@dataclass
class Cluster:
    """A Redis Cluster of our own: `url` names one node (kvbus finds the rest); `nodes` maps port to process."""

    url: str
    nodes: dict[int, subprocess.Popen[bytes]]

    def masters(self) -> list[int]:
        """The ports of the nodes that serve slots now."""
        with redis.Redis(port=next(iter(self.nodes)), decode_responses=True, socket_timeout=2) as client:
            lines = client.execute_command("CLUSTER", "NODES").splitlines()
        # A master's line ends with its slot ranges; a replica's, or a master that lost its slots, does not.
        return sorted(
            int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
            for line in lines
            if "master" in line.split()[2] and len(line.split()) > 8
        )


def _cluster_ports(count: int) -> list[int]:
    """`count` free loopback ports whose cluster bus ports (+10000) are free too, both below the kernel's
    ephemeral range (32768 and up), where any client socket could take one before redis-server binds it."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20_000, 22_768)
        if port in ports:
            continue
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        ports.append(port)
    return ports


def _cluster_ok(ports: Sequence[int], masters: int) -> bool:
    for port in ports:
        with redis.Redis(port=port, decode_responses=True, socket_timeout=1) as client:
            info = client.cluster("info")
            if info["cluster_state"] != "ok" or int(info["cluster_size"]) != masters:
                return False
    return True


@contextlib.contextmanager
def redis_cluster(workdir: Path, masters: int = 3) -> Iterator[Cluster]:
    """A Redis Cluster of `masters` masters with one replica each, on free loopback ports, without persistence;
    every node is stopped by pid afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH")
    nodes: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for port in _cluster_ports(masters * 2):
            node_dir = workdir / f"cluster-{port}"
            node_dir.mkdir()
            with (node_dir / "redis.log").open("ab") as out:
                nodes[port] = subprocess.Popen(
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
                    + ["--cluster-config-file", "nodes.conf", "--dir", str(node_dir), "--save", "", "--appendonly"]
                    + ["no", "--daemonize", "no"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        for port, proc in nodes.items():
            probe = redis.Redis(port=port, socket_connect_timeout=0.5)
            try:
                _wait(probe.ping, proc, f"cluster node on port {port}", None)
            finally:
                probe.close()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in nodes)]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        first = next(iter(nodes.values()))
        _wait(lambda: _cluster_ok(list(nodes), masters), first, "the cluster to cover every slot", None)
        yield Cluster(f"redis://127.0.0.1:{next(iter(nodes))}/0", nodes)
    finally:
        for proc in nodes.values():
            stop(proc)


@contextlib.contextmanager
def controller(redis_url: str, workdir: Path, env: dict[str, str] | None = None) -> Iterator[Proc]:
    """`python -m kvbus controller` on a free port, ready once GET /healthz answers 200; `url` is its base URL.

    `env` adds to its environment (an API token, say)."""
    port = free_port()
    log = workdir / f"controller-{port}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvbus",
                "controller",
                "--port",
                str(port),
                "--redis-url",
                redis_url,
                "--log-level",
                "warning",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**_env(), **(env or {})},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, proc, "controller", log)
        yield Proc(proc, base)
    finally:
        stop(proc)


@contextlib.contextmanager
def agents(
    redis_url: str,
    instance_ids: Sequence[str],
    workdir: Path,
    *,
    extra_config: Callable[[str], dict[str, object]] | None = None,
    args: Sequence[str] = (),
) -> Iterator[list[Proc]]:
    """One `python -m kvbus agent` process per instance id, started together and each ready once it is
    alive and reads its command stream. `extra_config(instance_id)` adds config keys; `args` go to each."""
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    client = redis_conn.connect(redis_url)  # a cluster client on a cluster: each key is asked of its node
    try:
        for instance_id in instance_ids:
            config = workdir / f"{instance_id}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "enable_controller": True,
                        "lmcache_instance_id": instance_id,
                        "redis_url": redis_url,
                        "chunk_size": CHUNK_SIZE,
                        "local_cpu": True,
                        "max_local_cpu_size": 1,
                        **(extra_config(instance_id) if extra_config else {}),
                    }
                )
            )
            log = workdir / f"agent-{instance_id}.log"
            with log.open("ab") as out:
                started.append(
                    (
                        instance_id,
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-m",
                                "kvbus",
                                "agent",
                                "--config",
                                str(config),
                                "--log-level",
                                "warning",
                                *args,
                            ],
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            env=_env(),
                        ),
                        log,
                    )
                )

        def ready(instance_id: str) -> Callable[[], object]:
            return lambda: client.exists(keys.alive(instance_id)) and client.xinfo_groups(keys.commands(instance_id))

        # Each agent imports torch (about 2 s of CPU): dozens started at once on a small box take a while.
        timeout = 30.0 + 2.0 * len(started)
        for instance_id, proc, log in started:
            _wait(ready(instance_id), proc, f"agent {instance_id}", log, timeout)
        yield [Proc(proc) for _, proc, _ in started]
    finally:
        client.close()
        for _, proc, _ in started:
            stop(proc)


@contextlib.contextmanager
def agent(redis_url: str, instance_id: str, workdir: Path) -> Iterator[Proc]:
    """`python -m kvbus agent` serving `instance_id`, ready once it is alive and reads its command stream."""
    with agents(redis_url, [instance_id], workdir) as (proc,):
        yield proc


@contextlib.contextmanager
def engine(redis_url: str, instance_id: str, workdir: Path) -> Iterator[Proc]:
    """`python -m kvbus engine` (the reference engine) serving `instance_id`, ready once /health answers."""
    config = workdir / f"engine-{instance_id}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "enable_controller": True,
                "lmcache_instance_id": instance_id,
                "redis_url": redis_url,
                "chunk_size": CHUNK_SIZE,
                "local_cpu": True,
                "max_local_cpu_size": 2,
            }
        )
    )
    port = free_port()
    log = workdir / f"engine-{instance_id}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvbus",
                "engine",
                "--config",
                str(config),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(f"{base}/health", timeout=1).status_code == 200, proc, "engine", log, timeout=120)
        yield Proc(proc, base)
    finally:
        stop(proc)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A scratch directory for configs and process logs, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="kvbus-bench-") as path:
        yield Path(path)


# ---------------------------------------------------------------- prompts and the index


def random_prompt(rng: torch.Generator, num_tokens: int = PROMPT_TOKENS) -> array:
    """`num_tokens` random ids from a Llama-3-sized vocabulary, as a compact array that hashes fast."""
    tokens = array("I")
    tokens.frombytes(torch.randint(0, VOCAB, (num_tokens,), dtype=torch.int32, generator=rng).numpy().tobytes())
    return tokens


def entries(tokens: Sequence[int]) -> list[IndexEntry]:
    """The index entries a backend reports when it admits `tokens`: one per chunk, the first one a head."""
    return [IndexEntry(c.key, c.num_tokens, c.start == 0) for c in SPACE.chunks(tokens)]


def unrelated_entries(rng: torch.Generator, num_chunks: int) -> list[IndexEntry]:
    """`num_chunks` entries of distinct prompts of 8192 tokens: a head, then 31 more chunks (the last
    prompt cut short).

    Their keys are random digests of the length the hash space produces rather than hashes of
    random prompts: to the index, a chained hash is just a random key, and hashing a million
    chunks' worth of prompts (~11 us a chunk) would take most of a quick run.
    """
    key_chars = len(SPACE.chunks(list(range(CHUNK_SIZE)))[0].key)
    per_prompt = PROMPT_TOKENS // CHUNK_SIZE
    raw = torch.randint(0, 256, (num_chunks * key_chars // 2,), dtype=torch.uint8, generator=rng)
    digits = raw.numpy().tobytes().hex()
    return [
        IndexEntry(digits[i * key_chars : (i + 1) * key_chars], CHUNK_SIZE, i % per_prompt == 0)
        for i in range(num_chunks)
    ]


def register(client: redis.Redis, instance_id: str, worker_id: int = 0, *, ttl_s: float = 5.0) -> Registration:
    """Register rank `worker_id` of `instance_id` as its agent would, for an instance whose index we write ourselves.

    `ttl_s`: how long its alive key lasts, as the agent's heartbeat_ttl; its `heartbeat()` beats as the agent does."""
    registration = Registration(
        client,
        instance_id=instance_id,
        worker_id=worker_id,
        space=SPACE,
        locations=[CPU],
        address=WorkerAddress("127.0.0.1", None, None),
        ttl_s=ttl_s,
    )
    registration.register()
    return registration


def ingest(client: redis.Redis, instance_id: str, admitted: Sequence[IndexEntry], worker_id: int = 0) -> None:
    """Admit `admitted` at LocalCPUBackend through rank `worker_id`'s IndexWriter, as a backend would, and flush it."""
    writer = IndexWriter(client, instance_id, worker_id)
    for entry in admitted:
        writer.admitted(CPU, entry)
    writer.flush()


def encoded_admissions(
    client: redis.Redis, instance_id: str, admitted: Sequence[IndexEntry], worker_id: int = 0
) -> tuple[IndexWriter, Taken]:
    """Rank `worker_id`'s IndexWriter with `admitted` at LocalCPUBackend, and its writes for them encoded, as the
    agent's command thread takes them to send ahead of an answer; `write_encoded` sends them."""
    writer = IndexWriter(client, instance_id, worker_id)
    for entry in admitted:
        writer.admitted(CPU, entry)
    taken = writer.take()
    if taken is None:
        raise ValueError(f"nothing to write for {instance_id}: no entries")
    return writer, taken


def write_encoded(client: redis.Redis, encoded: Sequence[tuple[IndexWriter, Taken]], window: int = 8) -> None:
    """Send `encoded_admissions`' writes on one connection, `window` instances' worth in flight, handing each
    writer its replies; raises the first error reply once its instance's replies are in."""
    pool = client.connection_pool
    conn = pool.get_connection()
    in_flight: deque[tuple[IndexWriter, Taken]] = deque()

    def settle() -> None:
        writer, taken = in_flight.popleft()
        replies = read_replies(conn, taken.replies)
        writer.written(taken, replies)
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply

    try:
        for writer, taken in encoded:
            conn.send_packed_command([taken.commands])
            in_flight.append((writer, taken))
            if len(in_flight) >= window:
                settle()
        while in_flight:
            settle()
    except BaseException:
        conn.disconnect()  # replies may be left unread
        raise
    finally:
        pool.release(conn)


def publish(client: redis.Redis, instance_id: str, held: Sequence[IndexEntry], worker_id: int = 0) -> None:
    """Index `held` as everything rank `worker_id` of `instance_id` holds at LocalCPUBackend, in one replacement,
    as a backend republishes its chunks on start: a faster way than `ingest` to fill a fresh instance's index."""
    writer = IndexWriter(client, instance_id, worker_id)
    writer.replaced(CPU, list(held))
    writer.drain()
