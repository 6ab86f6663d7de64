"""kvbus beside LMCache 0.5.6's real `lmcache_controller`, interleaved in one run: every figure of issue 12.

    python -m bench.vs_lmcache [--runs N] [--quick] [--json PATH]     (or: python -m bench --only vs_lmcache)

LMCache side: LMCache's own controller (`python -m lmcache.v1.api_server` from .venv-lmcache, made here by
`bash scripts/install-lmcache` when it is missing), with tests/lmcache/fake_fleet.py's workers: LMCache 0.5.6's
protocol over real ZMQ (a DEALER and a PUSH socket per worker, admits in 50-op BatchedKVOperationMsg frames)
and the workers' REP side answered by two AnswerPool processes, one answering clears with 0 tokens and one
with 256,000 (an instance holding 1000 chunks; LMCache's controller only relays the worker's count). 1000
workers register at once and admit 1000 chunk hashes each; the last one registered holds the looked-up
prompt (in LMCache's own chunk hashes), so LMCache's lookup scans every instance before it finds it.

kvbus side: a `kvbus controller` and real `kvbus agent` processes (one per instance that clears target,
holding nothing, as in bench/clear.py), plus the 1000 instances' registrations and indexes written as
bench/lookup.py writes them, through one IndexWriter per instance (the last one holding the prompt). The
first clear of a full instance goes to an agent process of its own (`agent-host` below: the Agent class of
`kvbus agent`, 1000 real chunks of 64 KiB, refilled between clears on a word over its stdin); /compress
goes to it too.

Both sides share the box, one redis-server of the run's own on a free loopback port, and the client
(bench/_http.py's keep-alive HTTP/1.1). For each figure LMCache is measured, then kvbus, twice over in
halves where it is cheap, so load on the box falls on both. Every answer is checked (a layout, a clear's
token count); a wrong one (or a 500, or no answer within 30 s) is counted in its row, not timed. CPU figures
come from /proc/<pid>/stat (10 ms ticks, so over many clears). Ratios are kvbus ÷ LMCache; with --runs N
the per-run tables are followed by medians and ranges.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import redis
import torch
import yaml

from bench import _http
from bench import ingest as ingest_bench
from bench._harness import (
    CHUNK_SIZE,
    MODEL,
    PROMPT_TOKENS,
    Figure,
    Proc,
    _env,
    _wait,
    controller,
    cpu_seconds,
    encoded_admissions,
    entries,
    free_port,
    note,
    percentile,
    random_prompt,
    redis_server,
    register,
    stop,
    thread_cpu_seconds,
    unrelated_entries,
    workdir,
    write_encoded,
)
from kvbus.shared import keys, redis_conn
from kvbus.shared.hashing import LMCacheHashSpace
from tests.lmcache.fake_fleet import CPU, Pushers, Worker, admit_frames
from tests.lmcache.fake_fleet import register as register_workers

REPO = Path(__file__).resolve().parents[1]
LMCACHE_PYTHON = REPO / ".venv-lmcache" / "bin" / "python"
FULL_CHUNKS = 1000  # chunks held by the instance whose first clear is timed, and compressed
FULL_TOKENS = FULL_CHUNKS * CHUNK_SIZE
CONCURRENCY = 32
PAUSE_S = 1.0  # before each burst of a fresh controller: longer than its start-up here (0.5-0.8 s)
# A single burst's p50 varies by a third from one burst to the next here: the row pools several controllers.
FRESH_TRIALS = 5
FRESH_LATER = 4
REQUEST_TIMEOUT_S = 30.0
AGENTS_START_S = 400.0


@dataclass(frozen=True)
class Sizes:
    instances: int
    chunks: int
    agents: int  # kvbus agent processes that clears target (and LMCache instances the concurrent clears spread over)
    floor: int  # requests per half for the cheap figures (HTTP floor, lookup miss)
    lm_lookups: int  # LMCache's holder-last lookup scans every instance: ~75 ms each at 1000 x 1000
    kv_lookups: int
    clears: int  # sequential, per half
    first_clears: int
    concurrent: int
    bursts: int
    idle_s: float
    ingest: int
    compress_rounds: int


FULL = Sizes(1000, 1000, 32, 500, 60, 500, 500, 40, 4096, 8, 10.0, 200_000, 3)
QUICK = Sizes(100, 1000, 8, 100, 20, 100, 100, 8, 512, 3, 3.0, 50_000, 1)


# ---------------------------------------------------------------- figures


@dataclass
class Row:
    """One figure for both sides (LMCache's may be missing), in display units, and the issue's target."""

    name: str
    unit: str
    lm: float | None
    kv: float
    target: str = "-"
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.lm is None or self.lm == 0 else self.kv / self.lm


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN: no right answer to time
        return "n/a"
    digits = 0 if abs(value) >= 100 else (3 if abs(value) < 0.1 else 2 if abs(value) < 10 else 1)
    return f"{value:,.{digits}f} {unit}".rstrip()


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None or ratio != ratio else f"{ratio:.2f}x"


def _print_rows(rows: Sequence[Row]) -> None:
    table = [("figure", "LMCache", "kvbus", "kvbus / LMCache", "target", "", "notes")]
    for r in rows:
        verdict = "-" if r.met is None else ("ok" if r.met else "MISS")
        table.append((r.name, _value(r.lm, r.unit), _value(r.kv, r.unit), _ratio(r.ratio), r.target, verdict, r.note))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _spread(values: Sequence[float | None], unit: str) -> str:
    present = [v for v in values if v is not None and v == v]
    if not present:
        return "-"
    middle = _value(statistics.median(present), unit)
    if len(present) == 1:
        return middle
    return f"{middle} ({_value(min(present), '')}-{_value(max(present), '')})"


def _print_medians(runs: Sequence[Sequence[Row]]) -> None:
    table = [("figure", "LMCache median (range)", "kvbus median (range)", "kvbus / LMCache median (range)", "target")]
    for position, first in enumerate(runs[0]):
        same = [run[position] for run in runs]
        ratios = [r.ratio for r in same if r.ratio is not None and r.ratio == r.ratio]
        ratio_text = "-"
        if ratios:
            ratio_text = f"{statistics.median(ratios):.2f}x" + (
                f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
            )
        met = [r.met for r in same if r.met is not None]
        verdict = "" if not met else f" [{sum(met)}/{len(met)} ok]"
        table.append(
            (
                first.name,
                _spread([r.lm for r in same], first.unit),
                _spread([r.kv for r in same], first.unit),
                ratio_text,
                first.target + verdict,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------- checked requests


Check = Callable[[bytes], str]  # what is wrong with a 200 answer's body, "" if nothing


@dataclass
class Sampled:
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)

    def __add__(self, other: Sampled) -> Sampled:
        return Sampled(self.latencies + other.latencies, self.wall_s + other.wall_s, self.errors + other.errors)

    @property
    def wrong(self) -> int:
        return sum(self.errors.values())

    def p(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000 if self.latencies else float("nan")

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else float("nan")

    def error_text(self) -> str:
        if not self.errors:
            return "0 wrong"
        kinds = ", ".join(f"{what[:60]} x{n}" for what, n in self.errors.most_common(2))
        return f"{self.wrong}/{self.wrong + len(self.latencies)} WRONG ({kinds})"


def _layout_check(expected: dict[str, int]) -> Check:
    def check(body: bytes) -> str:
        layout = {instance: held for instance, (_, held) in json.loads(body)["layout_info"].items()}
        return "" if layout == expected else f"layout {str(layout)[:40]}"

    return check


def _clear_check(tokens: int) -> Check:
    def check(body: bytes) -> str:
        answer = json.loads(body)
        ok = answer.get("num_tokens") == tokens and str(answer.get("event_id", "")).startswith("Clear")
        return "" if ok else f"answer {str(answer)[:60]}"

    return check


def _status_error(status: int, body: bytes) -> str:
    try:
        answer = json.loads(body)
    except ValueError:
        return f"{status} {body[:40]!r}"
    return f"{status} {answer.get('detail', answer.get('error', ''))}"


async def _sample(
    base_url: str,
    requests: Sequence[bytes],
    tasks: int,
    count: int,
    check: Check,
    warmup: int = 5,
    pinned: bool = False,
) -> Sampled:
    """`count` requests from `tasks` keep-alive connections after `warmup` per connection: round-robin over
    `requests`, or, `pinned`, connection i always sending request i (one in flight per instance). Every
    answer is checked; a wrong one is counted, not timed. A connection whose request got no answer within
    REQUEST_TIMEOUT_S is abandoned (its remaining requests are counted as not sent)."""
    conns = await _http.connections(base_url, tasks)
    shared = itertools.cycle(requests).__next__
    result = Sampled()

    async def worker(number: int, n: int, into: Sampled) -> None:
        conn = conns[number]
        pick = (lambda: requests[number % len(requests)]) if pinned else shared
        for done in range(n):
            started = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(conn.send(pick()), REQUEST_TIMEOUT_S)
            except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
                into.errors[f"no answer ({type(exc).__name__})"] += 1
                into.errors["not sent after a lost connection"] += n - done - 1
                return
            elapsed = time.perf_counter() - started
            wrong = _status_error(status, body) if status != 200 else check(body)
            if wrong:
                into.errors[wrong] += 1
            else:
                into.latencies.append(elapsed)

    try:
        if warmup:
            await asyncio.gather(*(worker(i, warmup, Sampled()) for i in range(tasks)))
        per_task, extra = divmod(count, tasks)
        started = time.perf_counter()
        await asyncio.gather(*(worker(i, per_task + (i < extra), result) for i in range(tasks)))
        result.wall_s = time.perf_counter() - started
    finally:
        await _http.close_all(conns)
    return result


def _clear(instance_id: str) -> bytes:
    return _http.encode_post("/clear", {"instance_id": instance_id, "location": CPU})


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------- LMCache's controller and fleet


def ensure_lmcache() -> None:
    """Reuse .venv-lmcache, or make it with scripts/install-lmcache (idempotent) when lmcache is not importable."""
    probe = [str(LMCACHE_PYTHON), "-c", "import lmcache.v1.api_server"]
    env = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1"}
    if LMCACHE_PYTHON.exists() and subprocess.run(probe, capture_output=True, env=env).returncode == 0:
        return
    note("vs_lmcache: installing LMCache 0.5.6 into .venv-lmcache (bash scripts/install-lmcache)")
    subprocess.run(["bash", str(REPO / "scripts" / "install-lmcache")], check=True, cwd=REPO)
    subprocess.run(probe, check=True, capture_output=True, env=env)


def _lmcache_env() -> dict[str, str]:
    """No LMCACHE_* of ours (they would override its config), no telemetry, no model hub, WARNING logs as
    kvbus's processes here; no PYTHONHASHSEED, as LMCache engines outside vLLM start their chain at 0."""
    env = {k: v for k, v in _env().items() if k != "PYTHONHASHSEED"}
    return {
        **env,
        "LMCACHE_TRACK_USAGE": "false",
        "DO_NOT_TRACK": "1",
        "LMCACHE_USAGE_TRACK_URL": "http://127.0.0.1:9/",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "LMCACHE_LOG_LEVEL": "WARNING",
    }


@dataclass
class LMCacheController:
    """`python -m lmcache.v1.api_server` of .venv-lmcache on 127.0.0.1 and free ports (the venv's
    `lmcache_controller` script is kvbus's, installed editable into the same venv)."""

    log: Path
    http: int = field(default_factory=free_port)
    pull: int = field(default_factory=free_port)
    reply: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self) -> None:
        argv = [str(LMCACHE_PYTHON), "-m", "lmcache.v1.api_server", "--host", "127.0.0.1", "--port", str(self.http)]
        argv += ["--monitor-ports", json.dumps({"pull": self.pull, "reply": self.reply})]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_lmcache_env())

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """It imports torch and transformers: long on a busy 2-core box."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lmcache controller exited:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/controller/key-stats", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"lmcache controller did not answer within {timeout_s:g} s")

    def key_count(self, client: httpx.Client) -> int:
        return int(client.get(f"{self.url}/controller/key-stats").json()["total_key_count"])


@contextlib.contextmanager
def _answer_pool(clear_tokens: int) -> Iterator[list[int]]:
    """fake_fleet's REP side in a process of its own (8 ROUTER sockets), answering clears with `clear_tokens`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.lmcache.fake_fleet", "answer", "8", str(clear_tokens)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the answer pool exited with {proc.wait(10)}")
        yield list(json.loads(line)["ports"])
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the pool answers until its stdin closes
        stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def _lm_instance(number: int) -> str:
    return f"lmc-{number:04d}"


def _kv_instance(number: int) -> str:
    return f"vs-{number:04d}"


def _kv_agent(number: int) -> str:
    return f"vs-agent-{number:02d}"


HOST_INSTANCE = "vs-full"


# ---------------------------------------------------------------- the agent holding 1000 chunks


def agent_host(config_path: str, tokens_path: str) -> None:
    """`kvbus agent`'s Agent in a process of its own, holding FULL_CHUNKS synthetic chunks; on each line
    "refill" from stdin it stores them again, flushes its index and answers with its CPU seconds before and after.
    The benchmark's own subcommand: `kvbus agent` has no way to be refilled from outside."""
    from kvbus.agent.agent import Agent
    from kvbus.agent.synthetic import synthetic_kv
    from kvbus.shared.config import load

    agent = Agent(load(config_path), model=MODEL)
    tokens = [int(t) for t in Path(tokens_path).read_text().split(",")]
    kv = synthetic_kv(agent.space, tokens)
    agent.start()
    try:
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "refill":
                continue
            before = time.process_time()
            agent.tiers.store(tokens, kv)
            agent.index.flush()
            gc.collect()  # the refill's tensors owe a collection; an engine's GC is its own business
            print(f"{before} {time.process_time()}", flush=True)
    finally:
        agent.stop()


class AgentHost:
    def __init__(self, redis_url: str, tmp: Path) -> None:
        config = tmp / f"{HOST_INSTANCE}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "enable_controller": True,
                    "lmcache_instance_id": HOST_INSTANCE,
                    "redis_url": redis_url,
                    "chunk_size": CHUNK_SIZE,
                    "local_cpu": True,
                    "max_local_cpu_size": 1,
                }
            )
        )
        prompt = tmp / "full-prompt.txt"
        prompt.write_text(",".join(str(1 + n % 120_000) for n in range(FULL_TOKENS)))
        self.log = tmp / "agent-host.log"
        with self.log.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.vs_lmcache", "agent-host", str(config), str(prompt)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=REPO,
                env=_env(),
            )

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"agent host exited:\n{self.log.read_text()[-2000:]}")
        return line.strip()

    def wait_ready(self) -> None:
        if self._line() != "ready":
            raise RuntimeError("agent host did not say ready")

    def refill(self) -> tuple[float, float]:
        """CPU seconds of the host when the refill began and when it ended."""
        assert self.process.stdin is not None
        self.process.stdin.write("refill\n")
        self.process.stdin.flush()
        before, after = self._line().split()
        return float(before), float(after)

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        stop(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


# ---------------------------------------------------------------- one run


@dataclass
class Stack:
    sizes: Sizes
    tmp: Path
    redis_url: str
    redis_pid: int
    lm: LMCacheController
    kv: Proc
    agents: list[Proc]
    host: AgentHost
    pool0: list[int]
    pool_full: list[int]
    loop: asyncio.Runner
    client: redis.Redis
    http: httpx.Client
    tokens: list[int]
    miss: list[int]
    rows: list[Row] = field(default_factory=list)

    def run(
        self, base_url: str, requests: Sequence[bytes], tasks: int, count: int, check: Check, **kw: int | bool
    ) -> Sampled:
        return self.loop.run(_sample(base_url, requests, tasks, count, check, **kw))

    def both(self, lm: Callable[[], Sampled], kv: Callable[[], Sampled], halves: int = 2) -> tuple[Sampled, Sampled]:
        """LMCache, then kvbus, `halves` times over: load on the box falls on both."""
        lm_all, kv_all = Sampled(), Sampled()
        for _ in range(halves):
            lm_all += lm()
            kv_all += kv()
        return lm_all, kv_all


def _populate(stack: Stack) -> None:
    sizes, lm = stack.sizes, stack.lm
    holder = sizes.instances - 1
    rng = random.Random(5)
    lm_prompt = [int(chunk.key) for chunk in LMCacheHashSpace(CHUNK_SIZE).chunks(stack.tokens)]
    workers = [
        Worker(_lm_instance(n), 0, (stack.pool_full if n in _lm_full(sizes) else stack.pool0)[n % 8])
        for n in range(sizes.instances)
    ]
    frames = []
    for n, worker in enumerate(workers):
        held = lm_prompt if n == holder else []
        frames.append(
            admit_frames(worker, held + [rng.getrandbits(64) - 2**63 for _ in range(sizes.chunks - len(held))])
        )
    total = sizes.instances * sizes.chunks
    note(f"vs_lmcache: registering {sizes.instances} LMCache workers at once")
    lm_register_s = register_workers(lm.reply, workers, timeout_s=120)
    pushers = Pushers(lm.pull, len(workers))
    try:
        time.sleep(0.3)  # every PUSH socket connected
        rss_before = _rss_bytes(lm.pid)
        note(f"vs_lmcache: LMCache admits {total:,} chunks")
        started = time.perf_counter()
        pushers.send((n, [batch[i]]) for i in range(len(frames[0])) for n, batch in enumerate(frames))
        deadline = time.monotonic() + 300
        while (held := lm.key_count(stack.http)) < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"LMCache's registry holds {held} of {total} keys after 300 s")
            time.sleep(0.05)  # each key-stats call walks the fleet on LMCache's loop: not too often
        lm_fill_s = time.perf_counter() - started
        if held != total:
            raise RuntimeError(f"LMCache's registry holds {held} keys, not {total}")
        lm_rss_delta = _rss_bytes(lm.pid) - rss_before
    finally:
        pushers.close()

    prompt = entries(stack.tokens)
    trng = torch.Generator().manual_seed(1)
    held_by = [
        (prompt if n == holder else []) + unrelated_entries(trng, sizes.chunks - (len(prompt) if n == holder else 0))
        for n in range(sizes.instances)
    ]
    note(f"vs_lmcache: kvbus registers {sizes.instances} instances and ingests {total:,} chunks")
    started = time.perf_counter()
    for n in range(sizes.instances):
        register(stack.client, _kv_instance(n))
        stack.client.set(keys.alive(_kv_instance(n)), 0, ex=3600)  # no heartbeat thread runs for these
    kv_register_s = time.perf_counter() - started
    # The agents' side of an admission is done before the clock starts, as LMCache's workers' frames are built
    # before its clock starts: both time the index's side, kvbus's Redis and LMCache's controller.
    started = time.perf_counter()
    encoded = [encoded_admissions(stack.client, _kv_instance(n), held_by[n]) for n in range(sizes.instances)]
    kv_encode_s = time.perf_counter() - started
    used_before = int(stack.client.info("memory")["used_memory"])
    started = time.perf_counter()
    write_encoded(stack.client, encoded)
    kv_fill_s = time.perf_counter() - started
    del encoded
    used_delta = int(stack.client.info("memory")["used_memory"]) - used_before
    label = f"{sizes.instances} x {sizes.chunks}"
    stack.rows += [
        Row(
            f"registering {sizes.instances} instances",
            "s",
            lm_register_s,
            kv_register_s,
            "<= 1.0x (ahead)",
            kv_register_s <= lm_register_s,
            "LMCache: DEALERs at once; kvbus: Registration per instance",
        ),
        Row(
            f"populating {label} chunks",
            "s",
            lm_fill_s,
            kv_fill_s,
            "<= 1.0x (ahead)",
            kv_fill_s <= lm_fill_s,
            "LMCache: admit frames, built before, until key-stats counts all; kvbus: each instance's "
            "IndexWriter writes, encoded before, sent 8 instances in flight until Redis has answered all",
        ),
        Row("  ingest rate while populating", "k/s", total / lm_fill_s / 1000, total / kv_fill_s / 1000),
        Row(
            "  the agents' encoding of those writes",
            "s",
            None,
            kv_encode_s,
            "-",
            None,
            f"IndexWriter.admitted x {sizes.chunks} + take, per instance, in one process: each agent's own CPU",
        ),
        Row(
            "memory per chunk",
            "B",
            lm_rss_delta / total,
            used_delta / total,
            "<= 1.0x (keep lead)",
            used_delta <= lm_rss_delta,
            "LMCache: controller RSS delta; kvbus: Redis used_memory delta",
        ),
    ]


def _floor_and_lookups(stack: Stack) -> None:
    sizes, lm, kv = stack.sizes, stack.lm, stack.kv
    empty = [_http.encode_post("/lookup", {"tokens": []})]
    none = _layout_check({})
    note("vs_lmcache: HTTP floor (POST /lookup with no tokens)")
    lm_floor, kv_floor = stack.both(
        lambda: stack.run(lm.url, empty, 1, sizes.floor, none), lambda: stack.run(kv.url, empty, 1, sizes.floor, none)
    )
    hit = [_http.encode_post("/lookup", {"tokens": stack.tokens})]
    holder = sizes.instances - 1
    note("vs_lmcache: /lookup, holder registered last")
    lm_hit, kv_hit = stack.both(
        lambda: stack.run(
            lm.url, hit, 1, sizes.lm_lookups // 2, _layout_check({_lm_instance(holder): PROMPT_TOKENS}), warmup=2
        ),
        lambda: stack.run(kv.url, hit, 1, sizes.kv_lookups // 2, _layout_check({_kv_instance(holder): PROMPT_TOKENS})),
    )
    miss = [_http.encode_post("/lookup", {"tokens": stack.miss})]
    note("vs_lmcache: /lookup of a prompt nobody holds")
    lm_miss, kv_miss = stack.both(
        lambda: stack.run(lm.url, miss, 1, sizes.floor, none), lambda: stack.run(kv.url, miss, 1, sizes.floor, none)
    )
    n = sizes.instances
    stack.rows += [
        Row(
            "HTTP floor p50 (POST /lookup, no tokens)",
            "ms",
            lm_floor.p(50),
            kv_floor.p(50),
            "<= 0.6x",
            _ok(lm_floor, kv_floor, 0.6),
            _wrong(lm_floor, kv_floor),
        ),
        Row(
            f"/lookup p50, N = {n}, holder registered last",
            "ms",
            lm_hit.p(50),
            kv_hit.p(50),
            "<= 0.05x",
            _ok(lm_hit, kv_hit, 0.05),
            _wrong(lm_hit, kv_hit),
        ),
        Row(
            f"/lookup p50, N = {n}, a miss",
            "ms",
            lm_miss.p(50),
            kv_miss.p(50),
            "<= 1.0x (keep lead)",
            _ok(lm_miss, kv_miss, 1.0),
            _wrong(lm_miss, kv_miss),
        ),
    ]


def _ok(lm: Sampled, kv: Sampled, ratio: float, q: float = 50) -> bool:
    return not kv.wrong and bool(kv.latencies) and kv.p(q) <= ratio * lm.p(q)


def _wrong(lm: Sampled, kv: Sampled) -> str:
    return f"LMCache {lm.error_text()}; kvbus {kv.error_text()}"


def _clears(stack: Stack) -> None:
    sizes, lm, kv = stack.sizes, stack.lm, stack.kv
    n = sizes.instances
    agent0 = stack.agents[0].pid
    cpu = [0.0]

    def kv_seq() -> Sampled:
        before = cpu_seconds(agent0)
        run = stack.run(kv.url, [_clear(_kv_agent(0))], 1, sizes.clears, _clear_check(0), warmup=20)
        time.sleep(0.05)  # what the clears left the agent's threads to do
        cpu[0] += cpu_seconds(agent0) - before
        return run

    note("vs_lmcache: sequential /clear")
    lm_seq, kv_seq_run = stack.both(
        lambda: stack.run(lm.url, [_clear(_lm_instance(0))], 1, sizes.clears, _clear_check(0), warmup=20), kv_seq
    )
    warmups = 2 * 20
    agent_cpu_ms = cpu[0] / (len(kv_seq_run.latencies) + kv_seq_run.wrong + warmups) * 1000
    stack.rows += [
        Row(
            f"/clear sequential p50, N = {n}",
            "ms",
            lm_seq.p(50),
            kv_seq_run.p(50),
            "<= 1.0x",
            _ok(lm_seq, kv_seq_run, 1.0),
            _wrong(lm_seq, kv_seq_run),
        ),
        Row(
            f"/clear sequential p99, N = {n}",
            "ms",
            lm_seq.p(99),
            kv_seq_run.p(99),
            "<= 1.5x",
            _ok(lm_seq, kv_seq_run, 1.5, 99),
        ),
        Row(
            "agent CPU per clear (empty agent)",
            "ms",
            None,
            agent_cpu_ms,
            "<= 0.2 ms",
            agent_cpu_ms <= 0.2,
            f"/proc/{{pid}}/stat over {2 * sizes.clears + warmups} sequential clears",
        ),
    ]

    note("vs_lmcache: first clear of an instance holding 1000 chunks")
    lm_first, kv_first = Sampled(), Sampled()
    host_cpu: list[float] = []
    last_after: float | None = None
    for number in _lm_full(sizes):
        lm_first += stack.run(lm.url, [_clear(_lm_instance(number))], 1, 1, _clear_check(FULL_TOKENS), warmup=0)
        before, after = stack.host.refill()
        if last_after is not None:
            host_cpu.append(before - last_after)
        last_after = after
        kv_first += stack.run(kv.url, [_clear(HOST_INSTANCE)], 1, 1, _clear_check(FULL_TOKENS), warmup=0)
        time.sleep(0.05)  # the agent's helper threads free the chunks
    before, _ = stack.host.refill()
    if last_after is not None:
        host_cpu.append(before - last_after)
    host_ms = statistics.fmean(host_cpu) * 1000 if host_cpu else float("nan")
    stack.rows += [
        Row(
            "first clear of an instance holding 1000 chunks, p50",
            "ms",
            lm_first.p(50),
            kv_first.p(50),
            "<= 1.5x",
            _ok(lm_first, kv_first, 1.5),
            _wrong(lm_first, kv_first),
        ),
        Row(
            "  agent CPU per clear of 1000 chunks",
            "ms",
            None,
            host_ms,
            "-",
            None,
            f"mean of {len(host_cpu)}: clear + frees, refills excluded",
        ),
    ]


def _lm_full(sizes: Sizes) -> range:
    """The LMCache instances whose worker answers a clear with FULL_TOKENS, each cleared once: just before the
    holder, which is registered last."""
    return range(sizes.instances - 1 - sizes.first_clears, sizes.instances - 1)


def _bursts(stack: Stack) -> None:
    """First bursts of 32 concurrent clears against steady state, two ways.

    To instances no command has reached yet, through each side's warm controller: a fleet's first traffic,
    where kvbus's agents and LMCache's workers meet their first command. Then a kvbus controller started
    just before, its first burst against its own later ones, each after the same pause: after any pause
    every process on the box wakes cold (a warm controller's burst after a pause of a second measured
    1.1-1.2x back-to-back bursts), and a first burst always follows one, the controller's start-up. Last, the
    control: the same starts and pauses, with the bursts to the warm controller."""
    sizes, lm, kv = stack.sizes, stack.lm, stack.kv
    base = sizes.instances // 2  # LMCache instances no command has reached yet
    lm_targets = [_clear(_lm_instance(base + i)) for i in range(CONCURRENCY)]
    kv_targets = [_clear(_kv_agent(i % sizes.agents)) for i in range(CONCURRENCY)]
    note("vs_lmcache: first burst of 32 concurrent clears, then steady state")
    lm_first = stack.run(lm.url, lm_targets, CONCURRENCY, CONCURRENCY, _clear_check(0), warmup=0)
    lm_steady = Sampled()
    for _ in range(sizes.bursts):
        lm_steady += stack.run(lm.url, lm_targets, CONCURRENCY, CONCURRENCY, _clear_check(0), warmup=0)
    kv_first = stack.run(kv.url, kv_targets, CONCURRENCY, CONCURRENCY, _clear_check(0), warmup=0)
    kv_steady = Sampled()
    for _ in range(sizes.bursts):
        kv_steady += stack.run(kv.url, kv_targets, CONCURRENCY, CONCURRENCY, _clear_check(0), warmup=0)
    note(f"vs_lmcache: {FRESH_TRIALS} fresh controllers' first bursts, each burst after a {PAUSE_S:g} s pause")
    firsts, laters, ratios = _restart_bursts(stack, kv_targets, fresh=True)
    note("vs_lmcache: the same bursts to the warm controller, while a controller starts beside it")
    warm_firsts, warm_laters, warm_ratios = _restart_bursts(stack, kv_targets, fresh=False)
    fresh_ratio = firsts.p(50) / laters.p(50)
    warm_ratio = warm_firsts.p(50) / warm_laters.p(50)
    stack.rows += [
        Row(
            "first burst of 32 concurrent clears, p50",
            "ms",
            lm_first.p(50),
            kv_first.p(50),
            "-",
            None,
            "to instances no command had reached, through a warm controller; " + _wrong(lm_first, kv_first),
        ),
        Row(
            "  steady-state bursts of 32, p50",
            "ms",
            lm_steady.p(50),
            kv_steady.p(50),
            "-",
            None,
            f"{sizes.bursts} back-to-back bursts after the first; " + _wrong(lm_steady, kv_steady),
        ),
        Row(
            "  first burst / steady state",
            "x",
            lm_first.p(50) / lm_steady.p(50),
            kv_first.p(50) / kv_steady.p(50),
        ),
        Row(
            "a fresh controller's first burst / its later bursts",
            "x",
            None,
            fresh_ratio,
            "<= 1.0",
            fresh_ratio <= 1.0 and not (firsts + laters).wrong,
            f"p50s of {FRESH_TRIALS} controllers' first bursts and their next {FRESH_LATER} each, every burst after a "
            f"{PAUSE_S:g} s pause (the first's is the start-up); one controller's ratio "
            f"{min(ratios):.2f}-{max(ratios):.2f}; kvbus {(firsts + laters).error_text()}",
        ),
        Row(
            "  the same, to the warm controller while one starts",
            "x",
            None,
            warm_ratio,
            "-",
            None,
            "the control: the same starts, stops and pauses on the box, the bursts to the controller that served "
            f"the whole run; one trial's ratio {min(warm_ratios):.2f}-{max(warm_ratios):.2f}; "
            f"kvbus {(warm_firsts + warm_laters).error_text()}",
        ),
        Row(
            "  first bursts, fresh controller / warm one",
            "x",
            None,
            firsts.p(50) / warm_firsts.p(50),
            "-",
            None,
            "p50s of the two rows above' first bursts: what being fresh costs, the box's state alike",
        ),
    ]


def _restart_bursts(stack: Stack, targets: list[bytes], *, fresh: bool) -> tuple[Sampled, Sampled, list[float]]:
    """FRESH_TRIALS times: a controller starts, a burst comes PAUSE_S after its start began, then FRESH_LATER
    bursts PAUSE_S apart, all to that controller (`fresh`) or all to the stack's warm one. The warm one is the
    control: every first burst follows a longer idle with a process starting on the box, which slows the agents
    and Redis too. Returns the first bursts, the later ones, and each trial's p50 ratio."""
    ratios: list[float] = []
    firsts, laters = Sampled(), Sampled()
    for _ in range(FRESH_TRIALS):
        paused = time.monotonic()
        with controller(stack.redis_url, stack.tmp) as started:
            url = started.url if fresh else stack.kv.url
            time.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused)))
            first = stack.run(url, targets, CONCURRENCY, CONCURRENCY, _clear_check(0), warmup=0)
            later = Sampled()
            for _ in range(FRESH_LATER):
                time.sleep(PAUSE_S)
                later += stack.run(url, targets, CONCURRENCY, CONCURRENCY, _clear_check(0), warmup=0)
        ratios.append(first.p(50) / later.p(50))
        firsts += first
        laters += later
    return firsts, laters, ratios


def _concurrent(stack: Stack) -> None:
    sizes, lm, kv = stack.sizes, stack.lm, stack.kv
    n, spread = sizes.instances, sizes.agents
    note(f"vs_lmcache: {spread} clears in flight over {spread} instances (one each), then {CONCURRENCY} to one")
    lm_spread, kv_spread = stack.both(
        lambda: stack.run(
            lm.url,
            [_clear(_lm_instance(i)) for i in range(spread)],
            spread,
            sizes.concurrent // 2,
            _clear_check(0),
            pinned=True,
        ),
        lambda: stack.run(
            kv.url,
            [_clear(_kv_agent(i)) for i in range(spread)],
            spread,
            sizes.concurrent // 2,
            _clear_check(0),
            pinned=True,
        ),
    )
    lm_one, kv_one = stack.both(
        lambda: stack.run(lm.url, [_clear(_lm_instance(0))], CONCURRENCY, sizes.concurrent // 2, _clear_check(0)),
        lambda: stack.run(kv.url, [_clear(_kv_agent(0))], CONCURRENCY, sizes.concurrent // 2, _clear_check(0)),
        halves=1,
    )
    stack.rows += [
        Row(
            f"/clear {spread} in flight over {spread} instances, N = {n}",
            "req/s",
            lm_spread.rate,
            kv_spread.rate,
            ">= 1.0x, 0 errors",
            kv_spread.rate >= lm_spread.rate and not kv_spread.wrong,
            f"p50 {lm_spread.p(50):.2f} / {kv_spread.p(50):.2f} ms; " + _wrong(lm_spread, kv_spread),
        ),
        Row(
            f"/clear {CONCURRENCY} in flight to one instance",
            "req/s",
            lm_one.rate,
            kv_one.rate,
            ">= 1.0x (keep lead)",
            kv_one.rate >= lm_one.rate and not kv_one.wrong,
            "rate of right answers; " + _wrong(lm_one, kv_one),
        ),
    ]


def _idle(stack: Stack) -> None:
    seconds = stack.sizes.idle_s
    note(f"vs_lmcache: {seconds:g} s with no commands")
    pids = {"lm": stack.lm.pid, "kv": stack.kv.pid, **{f"a{i}": p.pid for i, p in enumerate(stack.agents)}}
    time.sleep(1.0)  # what the last commands left to do
    # Nanoseconds, not ticks: 10 ms ticks over the window resolve only 0.1 % of a core per process.
    before = {name: thread_cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    share = {name: (thread_cpu_seconds(pid) - before[name]) / seconds * 100 for name, pid in pids.items()}
    agents_share = [v for k, v in share.items() if k.startswith("a")]
    per_agent = statistics.fmean(agents_share)
    stack.rows += [
        Row(
            "idle agent CPU",
            "% core",
            None,
            per_agent,
            "<= 0.05 %",
            per_agent <= 0.05,
            f"mean of {len(agents_share)} agents over {seconds:g} s, by schedstat (max {max(agents_share):.3f} %)",
        ),
        Row(
            "  idle controller CPU",
            "% core",
            share["lm"],
            share["kv"],
            "-",
            None,
            f"fleet of {stack.sizes.instances} registered",
        ),
    ]


def _ingest(stack: Stack, lm_rate: float) -> None:
    total = stack.sizes.ingest
    note(f"vs_lmcache: one agent's IndexWriter ingests {total:,} chunks")
    elapsed = ingest_bench.measure(stack.redis_url, total, instance_id="vs-ingest")
    rate = total / elapsed / 1000
    stack.rows.append(
        Row(
            "ingest, one agent process vs LMCache's admit rate",
            "k/s",
            lm_rate,
            rate,
            ">= 600k/s and >= 1.0x",
            rate >= 600 and rate >= lm_rate,
            f"kvbus: 1 IndexWriter, flush thread on, {total:,} chunks; LMCache: its populating rate above",
        )
    )


def _compress(stack: Stack) -> None:
    """Lossless /compress and back of the host's 1000 chunks: zstd, the fast method, against the target, and
    zlib beside it for reference."""
    rounds = stack.sizes.compress_rounds
    for method in ("zstd", "zlib"):
        note(f"vs_lmcache: {rounds} rounds of lossless /compress ({method}) of 1000 chunks")
        body = {"instance_id": HOST_INSTANCE, "location": CPU, "method": method}
        there, back = [_http.encode_post("/compress", body)], [_http.encode_post("/decompress", body)]
        check = _clear_less_check(FULL_TOKENS)
        compressed = Sampled()
        for _ in range(rounds):
            compressed += stack.run(stack.kv.url, there, 1, 1, check, warmup=0)
            stack.run(stack.kv.url, back, 1, 1, check, warmup=0)
        fast = method == "zstd"
        stack.rows.append(
            Row(
                f"lossless /compress ({method}) of 1000 chunks (64 MiB), p50"
                if fast
                else f"  /compress ({method}), for reference",
                "ms",
                None,
                compressed.p(50),
                "<= 500 ms" if fast else "-",
                not compressed.wrong and compressed.p(50) <= 500 if fast else None,
                f"p99 {compressed.p(99):.0f} ms over {rounds}; {compressed.error_text()}"
                + (
                    "; LMCache 0.5.6 relays /compress to each worker's engine.compress(), which knows only "
                    "'cachegen' (lossy) and answers 0 tokens for any other method; its controller waits with no "
                    "deadline"
                    if fast
                    else ""
                ),
            )
        )


def _clear_less_check(tokens: int) -> Check:
    def check(body: bytes) -> str:
        answer = json.loads(body)
        return "" if answer.get("num_tokens") == tokens else f"answer {str(answer)[:60]}"

    return check


def _footprint(stack: Stack) -> None:
    lm_rss = _rss_bytes(stack.lm.pid) / 1e6
    kv_rss = _rss_bytes(stack.kv.pid) / 1e6
    used = int(stack.client.info("memory")["used_memory"]) / 1e6
    stack.rows.append(
        Row(
            "controller RSS",
            "MB",
            lm_rss,
            kv_rss,
            "<= 1.0x (keep lead)",
            kv_rss <= lm_rss,
            f"at the end of the run; kvbus's index is in Redis: used_memory {used:.0f} MB",
        )
    )


@contextlib.contextmanager
def _agents(redis_url: str, instance_ids: Sequence[str], tmp: Path) -> Iterator[list[Proc]]:
    """bench/_harness.agents with a deadline for all of them together that a busy box can meet: 32 agents
    importing torch at once beside LMCache's controller took 85 s on an idle 2-core box, and more than the
    harness's 94 s when other work shared it."""
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    client = redis_conn.connect(redis_url)
    try:
        for instance_id in instance_ids:
            config = tmp / f"{instance_id}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "enable_controller": True,
                        "lmcache_instance_id": instance_id,
                        "redis_url": redis_url,
                        "chunk_size": CHUNK_SIZE,
                        "local_cpu": True,
                        "max_local_cpu_size": 1,
                    }
                )
            )
            log = tmp / f"agent-{instance_id}.log"
            argv = [sys.executable, "-m", "kvbus", "agent", "--config", str(config), "--log-level", "warning"]
            with log.open("ab") as out:
                started.append(
                    (instance_id, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env()), log)
                )
        deadline = time.monotonic() + AGENTS_START_S
        for instance_id, proc, log in started:

            def ready(instance_id: str = instance_id) -> object:
                return client.exists(keys.alive(instance_id)) and client.xinfo_groups(keys.commands(instance_id))

            _wait(ready, proc, f"agent {instance_id}", log, max(1.0, deadline - time.monotonic()))
        yield [Proc(proc) for _, proc, _ in started]
    finally:
        client.close()
        for _, proc, _ in started:
            stop(proc)


@contextlib.contextmanager
def _stack(sizes: Sizes) -> Iterator[Stack]:
    rng = torch.Generator().manual_seed(1)
    tokens = random_prompt(rng).tolist()
    miss = random_prompt(rng).tolist()
    with workdir() as tmp, redis_server(tmp) as server:
        lm = LMCacheController(tmp / "lmcache-controller.log")
        host: AgentHost | None = None
        try:
            lm.launch()  # it and the agents import torch at once: start them together
            host = AgentHost(server.url, tmp)
            with (
                controller(server.url, tmp) as kv,
                _agents(server.url, [_kv_agent(i) for i in range(sizes.agents)], tmp) as agent_procs,
                _answer_pool(0) as pool0,
                _answer_pool(FULL_TOKENS) as pool_full,
                _http.runner() as loop,
                httpx.Client(timeout=30) as http,
            ):
                lm.wait_ready()
                host.wait_ready()
                client = redis_conn.connect(server.url)
                try:
                    yield Stack(
                        sizes,
                        tmp,
                        server.url,
                        server.pid,
                        lm,
                        kv,
                        agent_procs,
                        host,
                        pool0,
                        pool_full,
                        loop,
                        client,
                        http,
                        tokens,
                        miss,
                    )
                finally:
                    client.close()
        finally:
            if host is not None:
                host.close()
            if lm.process is not None:
                stop(lm.process)


def one_run(quick: bool) -> list[Row]:
    sizes = QUICK if quick else FULL
    ensure_lmcache()
    started = time.perf_counter()
    with _stack(sizes) as stack:
        note(f"vs_lmcache: every process ready after {time.perf_counter() - started:.0f} s")
        _populate(stack)
        lm_rate = next(r.lm for r in stack.rows if r.name.startswith("  ingest rate"))
        _floor_and_lookups(stack)
        _clears(stack)
        _bursts(stack)
        _concurrent(stack)
        _idle(stack)
        _ingest(stack, lm_rate or float("nan"))
        _compress(stack)
        _footprint(stack)
        rows = stack.rows
    note(f"vs_lmcache: run took {time.perf_counter() - started:.0f} s")
    return rows


def run(quick: bool) -> list[Figure]:
    """One run as bench/run_all's figures."""
    return [
        Figure(
            r.name,
            r.note,
            f"LMCache {_value(r.lm, r.unit)} | kvbus {_value(r.kv, r.unit)} | {_ratio(r.ratio)}",
            r.target,
            r.met,
            {k: v for k, v in (("lmcache", r.lm), ("kvbus", r.kv), ("ratio", r.ratio)) if v is not None},
        )
        for r in one_run(quick)
    ]


def _tree() -> str:
    """Which kvbus code ran: its directory, and the commit with how many product files differ from it."""
    import kvbus.controller

    where = Path(kvbus.controller.__file__).resolve().parents[1]
    git = ["git", "-C", str(where)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return f"kvbus from {where} (not a git checkout)"
    changed = subprocess.run(
        [*git, "status", "--porcelain", "--", "agent", "controller", "shared", "kvbus", "engine"],
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    return f"kvbus from {where} at {head.stdout.strip()}" + (
        f", {len(changed)} product files changed" if changed else ""
    )


def main() -> None:
    if sys.argv[1:2] == ["agent-host"]:
        agent_host(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="whole runs, each with fresh processes (3)")
    parser.add_argument("--quick", action="store_true", help="a fleet of 100, fewer samples: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write every run's rows to PATH as JSON")
    args = parser.parse_args()
    runs: list[list[Row]] = []
    for number in range(args.runs):
        started = time.perf_counter()
        runs.append(one_run(args.quick))
        print(
            f"\nrun {number + 1} of {args.runs}{' (quick)' if args.quick else ''}, "
            f"{time.perf_counter() - started:.0f} s, {time.strftime('%Y-%m-%d %H:%M %Z')}; {_tree()}\n"
        )
        _print_rows(runs[-1])
    if args.runs > 1:
        print(f"\nmedians and ranges over {args.runs} runs\n")
        _print_medians(runs)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"quick": args.quick, "runs": [[asdict(r) for r in run] for run in runs]}, indent=2)
        )


if __name__ == "__main__":
    main()
