"""LMCache workers on kvbus: `/lookup` and `/clear` at 10, 100 and 1000 LMCache instances x 1000 chunks beside the
same figures for kvbus agents, and the ingest of LMCache's admit ops over ZMQ into Redis.

LMCache side: one `kvbus controller --monitor-ports` process and its own redis-server. The workers are
tests/lmcache/fake_fleet.py's, speaking LMCache 0.5.6's protocol over real ZMQ as LMCacheWorker frames it:
each registers from a DEALER of its own (a fleet's new workers all at once), then admits its chunks on a PUSH
socket of its own in BatchedKVOperationMsg frames of 50 numbered ops, one frame per multipart (a worker
flushing each batch as it fills). Nothing is written to Redis but by the controller. The workers' REP side is
simulated: one process (`python -m tests.lmcache.fake_fleet answer`) with 8 ROUTER sockets answers for every
worker (worker i registers the port of socket i % 8), clears with 0 tokens and no evictions (so, as in
bench/clear.py, a clear measures the command path, not freeing memory) and health probes with 0. LMCache
workers send no heartbeats by default, so the controller keeps them alive by probing them with health
messages; its idle CPU with the fleet registered is reported.

Three instances hold the looked-up 8192-token prompt (two all of it, one its first half), in LMCache's chunk
hashes (LMCacheHashSpace: CPython's hash chain, no vLLM); every other chunk is a random 64-bit hash.

Agent side: bench/lookup.py's fleet (registrations and indexes written in-process, the same prompt in kvbus's
hash space), and clears through real `kvbus agent` processes as bench/clear.py sends them (4 agents, sequential
to one, concurrent round-robin over the 4), on a controller and redis-server of their own.

Both sides' requests go over bench/_http.py's keep-alive connections and every answer is checked (the layout, or
a clear's 0 tokens); a wrong one (a layout missing a holder, a 503 or a 504) is left out of the latencies and
counted in its row, which then misses its target, rather than stopping the benchmark.

Ingest: 100 fake LMCache workers push admit ops as fast as ZMQ takes them (the pushes queue in ZMQ, nothing
is dropped), and the clock runs from the first push until the index holds every chunk (HLEN of every worker's
index, polled every 5 ms); then at a steady 200k ops/s offered, where the lag after the last push shows
whether the controller keeps up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
import torch

from bench import _http
from bench import lookup as agent_lookup
from bench._harness import (
    CHUNK_SIZE,
    Figure,
    Proc,
    agents,
    busy_fraction,
    controller,
    cpu_jiffies,
    cpu_seconds,
    entries,
    free_port,
    main,
    ms,
    note,
    percentile,
    random_prompt,
    redis_server,
    stop,
    workdir,
)
from kvbus.agent.backends.base import IndexEntry
from kvbus.shared import keys, redis_conn
from kvbus.shared.hashing import LMCacheHashSpace
from tests.lmcache.fake_fleet import CPU, LMCACHE_BATCH, Pushers, Worker, admit_frames, register

INSTANCE_COUNTS = (10, 100, 1000)
CHUNKS_PER_INSTANCE = 1000
HOLDERS = agent_lookup.HOLDERS  # instance number -> chunks of the looked-up prompt it holds
ANSWER_SOCKETS = 8
CONCURRENCY = 32
AGENT_INSTANCES = [f"bench-agent-{n}" for n in range(4)]
TARGET_P50_S = 0.002
TARGET_INGEST = 200_000.0
INGEST_WORKERS = 100
POLL_S = 0.005
PACED_TICK_S = 0.005
MAX_LAG_S = 0.25  # a paced run keeps up when the index is complete this soon after the last push


def _lmcache_instance(number: int) -> str:
    return f"lmc-{number:04d}"


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Ports:
    pull: int
    reply: int
    heartbeat: int

    def flag(self) -> str:
        return json.dumps({"pull": self.pull, "reply": self.reply, "heartbeat": self.heartbeat})


@contextlib.contextmanager
def _lmcache_controller(redis_url: str, tmp: Path) -> Iterator[tuple[Proc, _Ports]]:
    """`python -m kvbus controller --monitor-ports ...` on free ports, ready once /healthz answers."""
    ports, port = _Ports(free_port(), free_port(), free_port()), free_port()
    log = tmp / f"controller-{port}.log"
    argv = [sys.executable, "-m", "kvbus", "controller", "--port", str(port), "--redis-url", redis_url]
    argv += ["--monitor-ports", ports.flag(), "--log-level", "warning"]
    # LMCache engines outside vLLM start their hash chain at 0 whatever PYTHONHASHSEED says; the controller
    # would read its own seed as theirs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_") and k != "PYTHONHASHSEED"}
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"controller exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("controller did not answer /healthz within 30 s")
            time.sleep(0.05)
        yield Proc(proc, base), ports
    finally:
        stop(proc)


@contextlib.contextmanager
def _answer_pool(sockets: int) -> Iterator[tuple[Proc, list[int]]]:
    """The fleet's REP side in a process of its own; yields it and its ROUTER sockets' ports."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.lmcache.fake_fleet", "answer", str(sockets), "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the pool prints its ports at once, or dies
        if not line:
            raise RuntimeError(f"the answer pool exited with {proc.wait(10)}")
        yield Proc(proc), list(json.loads(line)["ports"])
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the pool answers until its stdin closes
        stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


# ---------------------------------------------------------------- the LMCache fleet


def _index_total(client: redis.Redis, index_keys: Sequence[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for key in index_keys:
        pipe.hlen(key)
    return sum(pipe.execute())


def _wait_indexed(client: redis.Redis, index_keys: Sequence[str], total: int, timeout_s: float = 300.0) -> float:
    """Poll until the indexes hold `total` chunks; returns the perf_counter time it was seen."""
    deadline = time.monotonic() + timeout_s
    while (held := _index_total(client, index_keys)) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the index holds {held} of {total} chunks after {timeout_s:g} s")
        time.sleep(POLL_S)
    return time.perf_counter()


class _LMCacheFleet:
    """Fake LMCache workers registered with one controller, their chunks admitted over ZMQ."""

    def __init__(self, client: redis.Redis, ports: _Ports, answer_ports: list[int], prompt: list[int]) -> None:
        self.client, self.ports, self.answer_ports = client, ports, answer_ports
        self.prompt_hashes = [int(chunk.key) for chunk in LMCacheHashSpace(CHUNK_SIZE).chunks(prompt)]
        self.workers: list[Worker] = []
        self.rng = random.Random(5)

    def grow(self, count: int, chunks: int) -> tuple[float, float]:
        """Register workers up to `count` at once, then admit `chunks` each; returns (registration s, admit s)."""
        new = [
            Worker(_lmcache_instance(n), 0, self.answer_ports[n % len(self.answer_ports)])
            for n in range(len(self.workers), count)
        ]
        registered_in = register(self.ports.reply, new, timeout_s=120)
        frames = []
        for number, worker in enumerate(new, start=len(self.workers)):
            held = self.prompt_hashes[: HOLDERS.get(number, 0)]
            hashes = held + [self.rng.getrandbits(64) - 2**63 for _ in range(chunks - len(held))]
            frames.append(admit_frames(worker, hashes))
        pushers = Pushers(self.ports.pull, len(new))
        index_keys = [keys.index(w.instance_id, 0, CPU) for w in new]
        try:
            started = time.perf_counter()
            # Round-robin over the workers, one 50-op frame per multipart, as many workers flushing at once.
            pushers.send((n, [batch[i]]) for i in range(len(frames[0])) for n, batch in enumerate(frames))
            done = _wait_indexed(self.client, index_keys, len(new) * chunks)
        finally:
            pushers.close()
        self.workers += new
        return registered_in, done - started


def _alive(client: redis.Redis, instance_ids: Sequence[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for instance_id in instance_ids:
        pipe.exists(keys.alive(instance_id))
    return sum(pipe.execute())


def _wait_alive(client: redis.Redis, instance_ids: Sequence[str], timeout_s: float = 120.0) -> float:
    """Wait until every instance has a heartbeat (lookups skip those without); returns the seconds waited."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while (alive := _alive(client, instance_ids)) < len(instance_ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{alive} of {len(instance_ids)} instances alive after {timeout_s:g} s")
        time.sleep(0.1)
    return time.perf_counter() - started


@dataclass
class _Sampled:
    """A run of requests: the latencies of the answers that were right, what was wrong with the others, and
    the controller's CPU seconds per request and how busy the box was meanwhile."""

    latencies: list[float]
    wall_s: float
    errors: Counter[str]
    controller_cpu_s: float = 0.0
    box_busy: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    def error_text(self) -> str:
        if not self.errors:
            return ""
        kinds = ", ".join(f"{what} x{n}" for what, n in self.errors.most_common(3))
        return f"; {sum(self.errors.values())} of {self.answered} WRONG: {kinds}"


Check = Callable[[bytes], str]  # what is wrong with a 200 answer's body, "" if nothing


async def _requests(
    base_url: str, requests: Sequence[bytes], tasks: int, count: int, check: Check, controller_pid: int
) -> _Sampled:
    """`count` requests from `tasks` concurrent keep-alive connections, round-robin over `requests`, after a
    warm-up of 5 per connection. Every answer is checked; a wrong one is counted, not raised."""
    conns = await _http.connections(base_url, tasks)
    pick = itertools.cycle(requests).__next__
    errors: Counter[str] = Counter()

    async def worker(conn: _http.Connection, n: int, latencies: list[float]) -> None:
        for _ in range(n):
            started = time.perf_counter()
            status, body = await conn.send(pick())
            elapsed = time.perf_counter() - started
            wrong = _error(body, status) if status != 200 else check(body)
            if wrong:
                errors[wrong] += 1
            else:
                latencies.append(elapsed)

    try:
        await asyncio.gather(*(worker(conn, 5, []) for conn in conns))
        errors.clear()
        latencies: list[float] = []
        per_task, extra = divmod(count, tasks)
        cpu_before, box_before = cpu_seconds(controller_pid), cpu_jiffies()
        started = time.perf_counter()
        await asyncio.gather(*(worker(conn, per_task + (i < extra), latencies) for i, conn in enumerate(conns)))
        wall = time.perf_counter() - started
        cpu = (cpu_seconds(controller_pid) - cpu_before) / count
        busy = busy_fraction(box_before, cpu_jiffies())
    finally:
        await _http.close_all(conns)
    return _Sampled(latencies, wall, errors, cpu, busy)


def _error(body: bytes, status: int) -> str:
    try:
        return f"{status} {json.loads(body).get('error', '')}"
    except ValueError:
        return f"{status}"


def _layout_check(expected: dict[str, int]) -> Check:
    def check(body: bytes) -> str:
        layout = {instance: held for instance, (_, held) in json.loads(body)["layout_info"].items()}
        return "" if layout == expected else f"layout of {len(layout)} inst, not {len(expected)}"

    return check


def _clear_check(body: bytes) -> str:
    answer = json.loads(body)
    ok = answer.get("num_tokens") == 0 and str(answer.get("event_id", "")).startswith("Clear")
    return "" if ok else f"answer {str(answer)[:60]}"


def _idle_cpu(pid: int, seconds: float = 2.0) -> float:
    """The cores a process uses while no request comes."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


def _p50_p99(run: _Sampled) -> tuple[float, float]:
    if not run.latencies:
        return float("nan"), float("nan")
    return percentile(run.latencies, 50), percentile(run.latencies, 99)


def _lookup_figure(side: str, count: int, chunks: int, run: _Sampled) -> Figure:
    p50, p99 = _p50_p99(run)
    return Figure(
        f"/lookup p50/p99, {side}",
        f"{count} inst x {chunks} chunks; layout {len(HOLDERS)} inst, checked; {run.answered} seq",
        f"{ms(p50)} / {ms(p99)} (ctl CPU {ms(run.controller_cpu_s)}, box {run.box_busy:.0%} busy){run.error_text()}",
        "p50 <= 2 ms",
        p50 <= TARGET_P50_S and not run.errors,
        {
            "instances": count,
            "p50_s": p50,
            "p99_s": p99,
            "controller_cpu_s_per_lookup": run.controller_cpu_s,
            "wrong": float(sum(run.errors.values())),
        },
    )


def _clear_figures(side: str, count: int, sequential: _Sampled, concurrent: list[tuple[str, _Sampled]]) -> list[Figure]:
    p50, p99 = _p50_p99(sequential)
    figures = [
        Figure(
            f"/clear p50/p99 sequential, {side}",
            f"fleet of {count} inst; 1 keep-alive connection; {sequential.answered} clears, checked",
            f"{ms(p50)} / {ms(p99)} (ctl CPU {ms(sequential.controller_cpu_s)}){sequential.error_text()}",
            "p50 <= 2 ms",
            p50 <= TARGET_P50_S and not sequential.errors,
            {
                "instances": count,
                "p50_s": p50,
                "p99_s": p99,
                "controller_cpu_s_per_clear": sequential.controller_cpu_s,
                "wrong": float(sum(sequential.errors.values())),
            },
        )
    ]
    for label, run in concurrent:
        rate = len(run.latencies) / run.wall_s
        c50, c99 = _p50_p99(run)
        figures.append(
            Figure(
                f"  /clear {CONCURRENCY} concurrent, {side}",
                f"fleet of {count} inst; round-robin over {label}; {run.answered} clears, checked",
                f"{rate:,.0f} clears/s; p50/p99 {ms(c50)} / {ms(c99)}; ctl CPU {ms(run.controller_cpu_s)} per clear"
                + run.error_text(),
                data={
                    "instances": count,
                    "clears_per_s": rate,
                    "p50_s": c50,
                    "p99_s": c99,
                    "wrong": float(sum(run.errors.values())),
                },
            )
        )
    return figures


def _clear_request(instance_id: str) -> bytes:
    return _http.encode_post("/clear", {"instance_id": instance_id, "location": CPU})


def _lmcache_side(quick: bool, tokens: list[int]) -> dict[int, list[Figure]]:
    chunks = 100 if quick else CHUNKS_PER_INSTANCE
    samples, clears, concurrent = (200, 200, 1024) if quick else (1000, 1000, 4096)
    lookup = [_http.encode_post("/lookup", {"tokens": tokens})]
    check = _layout_check({_lmcache_instance(n): held * CHUNK_SIZE for n, held in HOLDERS.items()})
    rows: dict[int, list[Figure]] = {}
    with (
        workdir() as tmp,
        redis_server(tmp) as server,
        _lmcache_controller(server.url, tmp) as (ctl, ports),
        _answer_pool(ANSWER_SOCKETS) as (_, answer_ports),
        _http.runner() as loop,
    ):
        client = redis_conn.connect(server.url)
        try:
            fleet = _LMCacheFleet(client, ports, answer_ports, tokens)
            for count in INSTANCE_COUNTS:
                added = count - len(fleet.workers)
                registered_in, admitted_in = fleet.grow(count, chunks)
                instance_ids = [w.instance_id for w in fleet.workers]
                lapsed = count - _alive(client, instance_ids)
                settled_in = _wait_alive(client, instance_ids)
                note(
                    f"lmcache_workers: {count} LMCache workers ({added} registered at once in {registered_in:.2f} s, "
                    f"{added * chunks} admits indexed in {admitted_in:.2f} s; {lapsed} without a heartbeat then, "
                    f"all alive {settled_in:.1f} s later)"
                )
                idle = _idle_cpu(ctl.pid)
                rows[count] = [
                    Figure(
                        "LMCache fleet: registration, admits, idle",
                        f"{added} workers registered at once over ZMQ, {added * chunks:,} admits in 50-op frames",
                        f"registered in {registered_in:.2f} s; admits indexed in {admitted_in:.2f} s "
                        f"({added * chunks / admitted_in:,.0f} ops/s; {lapsed} inst had lost their heartbeat by "
                        f"then); idle controller {idle:.2f} cores (health probes: LMCache workers send no heartbeats)",
                        data={
                            "instances": count,
                            "registration_s": registered_in,
                            "admit_s": admitted_in,
                            "lapsed_during_admits": lapsed,
                            "idle_controller_cores": idle,
                        },
                    )
                ]
                rows[count].append(
                    _lookup_figure(
                        "LMCache workers",
                        count,
                        chunks,
                        loop.run(_requests(ctl.url, lookup, 1, samples, check, ctl.pid)),
                    )
                )
                note(f"lmcache_workers: clears through LMCache workers, fleet of {count}")
                targets = [_clear_request(_lmcache_instance(n)) for n in range(min(count, CONCURRENCY))]
                sequential = loop.run(_requests(ctl.url, targets[:1], 1, clears, _clear_check, ctl.pid))
                spread = [
                    (
                        f"{instances} inst (each answered by the pool's ROUTER sockets)",
                        loop.run(
                            _requests(ctl.url, targets[:instances], CONCURRENCY, concurrent, _clear_check, ctl.pid)
                        ),
                    )
                    for instances in sorted({4, len(targets)})
                ]
                rows[count] += _clear_figures("LMCache workers", count, sequential, spread)
        finally:
            client.close()
    return rows


# ---------------------------------------------------------------- kvbus agents


def _agent_side(quick: bool, tokens: list[int]) -> dict[int, list[Figure]]:
    samples, clears, concurrent = (200, 200, 1024) if quick else (1000, 1000, 4096)
    chunks = 100 if quick else CHUNKS_PER_INSTANCE
    lookup = [_http.encode_post("/lookup", {"tokens": tokens})]
    check = _layout_check({agent_lookup._instance(n): held * CHUNK_SIZE for n, held in HOLDERS.items()})
    prompt = entries(tokens)
    rng = torch.Generator().manual_seed(1)
    rows: dict[int, list[Figure]] = {}
    with (
        workdir() as tmp,
        redis_server(tmp) as server,
        controller(server.url, tmp) as ctl,
        agents(server.url, AGENT_INSTANCES, tmp),
        _http.runner() as loop,
    ):
        client = redis_conn.connect(server.url)
        try:
            populated = 0
            targets = [_clear_request(instance) for instance in AGENT_INSTANCES]
            for count in INSTANCE_COUNTS:
                _populate(client, rng, range(populated, count), prompt, chunks)
                populated = count
                note(f"lmcache_workers: agents' fleet now {count} instances x {chunks} chunks")
                rows[count] = [
                    _lookup_figure(
                        "kvbus agents", count, chunks, loop.run(_requests(ctl.url, lookup, 1, samples, check, ctl.pid))
                    )
                ]
                sequential = loop.run(_requests(ctl.url, targets[:1], 1, clears, _clear_check, ctl.pid))
                spread = [
                    (
                        f"{len(AGENT_INSTANCES)} agent processes",
                        loop.run(_requests(ctl.url, targets, CONCURRENCY, concurrent, _clear_check, ctl.pid)),
                    )
                ]
                rows[count] += _clear_figures(
                    f"kvbus agents ({len(AGENT_INSTANCES)} processes + {count} registered)", count, sequential, spread
                )
        finally:
            client.close()
    return rows


def _populate(client: redis.Redis, rng: torch.Generator, numbers: range, prompt: list[IndexEntry], chunks: int) -> None:
    """bench/lookup.py's fleet, with `chunks` per instance."""
    saved = agent_lookup.CHUNKS_PER_INSTANCE
    agent_lookup.CHUNKS_PER_INSTANCE = chunks
    try:
        agent_lookup._populate(client, rng, numbers, prompt)
    finally:
        agent_lookup.CHUNKS_PER_INSTANCE = saved


# ---------------------------------------------------------------- ingest


@dataclass
class _IngestRun:
    ops: int
    pushed_s: float  # first push to last push
    indexed_s: float  # first push to the index holding every chunk
    cpu: dict[str, float]  # CPU seconds per op of each process
    box_busy: float

    @property
    def rate(self) -> float:
        return self.ops / self.indexed_s

    @property
    def lag_s(self) -> float:
        return self.indexed_s - self.pushed_s


def _ingest_run(
    client: redis.Redis,
    ports: _Ports,
    answer_ports: list[int],
    procs: dict[str, int],
    per_worker: int,
    *,
    frames_per_send: int,
    paced_rate: float | None,
) -> _IngestRun:
    client.flushall()
    workers = [Worker(f"ingest-{n:03d}", 0, answer_ports[n % len(answer_ports)]) for n in range(INGEST_WORKERS)]
    register(ports.reply, workers, timeout_s=60)
    rng = random.Random(11)
    frames = [admit_frames(w, [rng.getrandbits(64) - 2**63 for _ in range(per_worker)]) for w in workers]
    sends = [
        (n, batch[i : i + frames_per_send])
        for i in range(0, len(frames[0]), frames_per_send)
        for n, batch in enumerate(frames)
    ]
    total = INGEST_WORKERS * per_worker
    index_keys = [keys.index(w.instance_id, 0, CPU) for w in workers]
    pushers = Pushers(ports.pull, INGEST_WORKERS)
    try:
        time.sleep(0.5)  # every PUSH socket connected
        before = {name: cpu_seconds(pid) for name, pid in procs.items()}
        box_before = cpu_jiffies()
        started = time.perf_counter()
        if paced_rate is None:
            pushers.send(sends)
        else:
            _paced(pushers, sends, paced_rate / (LMCACHE_BATCH * frames_per_send))
        pushed = time.perf_counter()
        done = _wait_indexed(client, index_keys, total)
        cpu = {name: (cpu_seconds(pid) - before[name]) / total for name, pid in procs.items()}
        busy = busy_fraction(box_before, cpu_jiffies())
    finally:
        pushers.close()
    return _IngestRun(total, pushed - started, done - started, cpu, busy)


def _paced(pushers: Pushers, sends: list[tuple[int, list[bytes]]], sends_per_s: float) -> None:
    """Send at `sends_per_s`, in ticks of PACED_TICK_S, catching up after a late tick."""
    per_tick = sends_per_s * PACED_TICK_S
    started, sent = time.perf_counter(), 0
    while sent < len(sends):
        due = min(len(sends), int((time.perf_counter() - started) / PACED_TICK_S * per_tick + per_tick))
        if due > sent:
            pushers.send(sends[sent:due])
            sent = due
        time.sleep(PACED_TICK_S / 2)


def _cpu_text(run: _IngestRun) -> str:
    return ", ".join(f"{name} {seconds * 1e6:.2f}" for name, seconds in run.cpu.items()) + f"; box {run.box_busy:.0%}"


def _ingest(quick: bool) -> list[Figure]:
    per_worker = 2000 if quick else 10_000
    figures = []
    with (
        workdir() as tmp,
        redis_server(tmp) as server,
        _lmcache_controller(server.url, tmp) as (ctl, ports),
        _answer_pool(4) as (pool, answer_ports),
    ):
        client = redis_conn.connect(server.url)
        procs = {"controller": ctl.pid, "redis": server.pid, "pushers": os.getpid()}
        try:
            for label, frames_per_send in (("1 frame (50 ops) per multipart", 1), ("50 frames per multipart", 50)):
                note(f"lmcache_workers: ingest burst, {INGEST_WORKERS * per_worker} ops, {label}")
                run = _ingest_run(
                    client, ports, answer_ports, procs, per_worker, frames_per_send=frames_per_send, paced_rate=None
                )
                figures.append(
                    Figure(
                        "LMCache admit ingest, burst" if frames_per_send == 1 else "  LMCache admit ingest, burst",
                        f"{INGEST_WORKERS} workers' PUSH sockets, {run.ops:,} admits as fast as ZMQ takes them; "
                        + label,
                        f"{run.rate:,.0f} ops/s (pushed in {run.pushed_s:.2f} s, indexed after {run.indexed_s:.2f} s)",
                        f">= {TARGET_INGEST:,.0f} ops/s",
                        run.rate >= TARGET_INGEST,
                        {"ops_per_s": run.rate, "ops": run.ops, "indexed_s": run.indexed_s},
                    )
                )
                figures.append(Figure("  CPU per admit op (us)", label, _cpu_text(run)))
            note(f"lmcache_workers: ingest paced at {TARGET_INGEST:,.0f} ops/s")
            run = _ingest_run(
                client, ports, answer_ports, procs, per_worker, frames_per_send=1, paced_rate=TARGET_INGEST
            )
            kept_up = run.lag_s <= MAX_LAG_S
            figures.append(
                Figure(
                    "LMCache admit ingest, paced",
                    f"{TARGET_INGEST:,.0f} ops/s offered for {run.pushed_s:.1f} s ({run.ops:,} ops), "
                    "1 frame (50 ops) per multipart",
                    f"index complete {run.lag_s * 1000:.0f} ms after the last push "
                    f"({run.rate:,.0f} ops/s overall; {'kept up' if kept_up else 'FELL BEHIND'})",
                    f"lag <= {MAX_LAG_S * 1000:.0f} ms",
                    kept_up,
                    {"lag_s": run.lag_s, "ops_per_s": run.rate, "offered_s": run.pushed_s},
                )
            )
            figures.append(Figure("  CPU per admit op (us)", "paced", _cpu_text(run)))
        finally:
            client.close()
    return figures


# ---------------------------------------------------------------- all of it


def run(quick: bool) -> list[Figure]:
    tokens = random_prompt(torch.Generator().manual_seed(1)).tolist()
    lmcache = _lmcache_side(quick, tokens)
    agents_rows = _agent_side(quick, tokens)
    figures: list[Figure] = []
    for count in INSTANCE_COUNTS:
        lm, ag = lmcache[count], agents_rows[count]
        figures += [lm[0], lm[1], ag[0], *lm[2:], *ag[1:]]
    return figures + _ingest(quick)


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
