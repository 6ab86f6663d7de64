"""`/clear` round trip over HTTP: sequential, then 32 concurrent, through real processes.

A clear is the bus's full path: the controller XADDs a command to the instance's stream, the
agent (a separate `kvbus agent` process, as in production) reads it, clears its backend, flushes
its index and XADDs the result to the controller's result stream, which the controller's reader
task hands back to the waiting request. The agents hold nothing, so this is the bus's own cost;
bench/clear_cost.py measures clearing 100k chunks.

"2000 clears/s from one controller process" is a claim about the controller, but one agent
serves its command stream one command at a time and can be the limit itself. So the 32
concurrent clears run twice through the same controller process: all to one instance, then
spread over 4 instances (4 agent processes, the instance chosen round-robin per request).

The load comes from bench/_http.py (a raw keep-alive HTTP/1.1 client, one connection per
concurrent task): httpx would cost more CPU per request than the controller. Every answer is
checked (200, `num_tokens` 0, an event id). CPU time per clear of each process (controller,
agents, redis, this client) shows where the time goes, which matters on a small box where all of
them share the cores; "cores" is CPU per clear times the rate, so a process near 1.0 is the
bottleneck. 1 / controller CPU per clear bounds what one controller process can serve.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any

from bench import _http
from bench._harness import (
    Figure,
    agents,
    busy_fraction,
    controller,
    cpu_jiffies,
    cpu_seconds,
    main,
    ms,
    note,
    percentile,
    redis_server,
    workdir,
)
from kvbus.shared.locations import Location

INSTANCES = [f"bench-clear-{n}" for n in range(4)]
CONCURRENCY = 32
TARGET_P50_S = 0.002
TARGET_RATE = 2000.0
WARMUP_PER_TASK = 20


def _request(instance_id: str) -> bytes:
    return _http.encode_post("/clear", {"instance_id": instance_id, "location": str(Location.CPU)})


def _check(status: int, body: bytes) -> None:
    """Raise unless this is a clear that reached an (empty) agent and came back."""
    answer = _http.check_json(status, body)
    if answer.get("num_tokens") != 0 or not str(answer.get("event_id", "")).startswith("Clear"):
        raise _http.HTTPError(f"unexpected /clear answer: {answer!r}")


class _Load:
    """Clears from `tasks` concurrent tasks, a keep-alive connection each; the instance of each request
    is the next one of `requests` (round-robin over all the tasks' requests together)."""

    def __init__(self, base_url: str, requests: list[bytes], tasks: int) -> None:
        self.base_url, self.requests, self.tasks = base_url, requests, tasks
        self._next = itertools.cycle(requests)

    async def _worker(self, conn: _http.Connection, n: int, latencies: list[float]) -> None:
        perf_counter, send, pick = time.perf_counter, conn.send, self._next.__next__
        for _ in range(n):
            request = pick()
            started = perf_counter()
            status, body = await send(request)
            latencies.append(perf_counter() - started)
            _check(status, body)

    async def measure(self, count: int, procs: dict[str, int]) -> tuple[list[float], float, dict[str, float]]:
        """Warm up (every connection open and used), then time `count` clears; returns the latencies,
        the wall time and each process's CPU seconds per clear."""
        conns = await _http.connections(self.base_url, self.tasks)
        try:
            warmup: list[float] = []
            await _gather(self._worker(conn, WARMUP_PER_TASK, warmup) for conn in conns)
            latencies: list[float] = []
            per_task, extra = divmod(count, self.tasks)
            before = _cpu(procs)
            started = time.perf_counter()
            await _gather(self._worker(conn, per_task + (i < extra), latencies) for i, conn in enumerate(conns))
            wall = time.perf_counter() - started
            cpu = _cpu_per_clear(procs, before, len(latencies))
        finally:
            await _http.close_all(conns)
        return latencies, wall, cpu


async def _gather(coros: Any) -> None:
    await asyncio.gather(*coros)


def _cpu(procs: dict[str, int]) -> dict[str, Any]:
    return {"box": cpu_jiffies(), **{name: cpu_seconds(pid) for name, pid in procs.items()}}


def _cpu_per_clear(procs: dict[str, int], before: dict[str, Any], count: int) -> dict[str, float]:
    """CPU seconds per clear of each process, and how busy the whole machine was meanwhile."""
    per = {name: (cpu_seconds(pid) - before[name]) / count for name, pid in procs.items()}
    return {**per, "box_busy": busy_fraction(before["box"], cpu_jiffies())}


def _only(procs: dict[str, int], agent_names: list[str]) -> dict[str, int]:
    """The processes to account for: the controller, redis, this client, and the agents named."""
    return {name: pid for name, pid in procs.items() if not name.startswith("agent") or name in agent_names}


def _cpu_data(cpu: dict[str, float]) -> dict[str, float]:
    return {(k if k == "box_busy" else f"cpu_s_per_clear_{k}"): v for k, v in cpu.items()}


def _cpu_text(cpu: dict[str, float], rate: float | None = None) -> str:
    """Microseconds of CPU per clear of each process, with the cores that makes at `rate`, and how busy
    the box was. Several agents are summed, with the busiest one's cores."""

    def text(name: str, seconds: float, busiest: float | None = None) -> str:
        if rate is None:
            return f"{name} {seconds * 1e6:.0f}"
        most = "" if busiest is None else f", busiest {busiest * rate:.2f}"
        return f"{name} {seconds * 1e6:.0f} ({seconds * rate:.2f} cores{most})"

    agent_cpu = [seconds for name, seconds in cpu.items() if name.startswith("agent")]
    parts = [
        text(name, seconds) for name, seconds in cpu.items() if name != "box_busy" and not name.startswith("agent")
    ]
    if len(agent_cpu) == 1:
        parts.insert(1, text("agent", agent_cpu[0]))
    elif agent_cpu:
        parts.insert(1, text(f"{len(agent_cpu)} agents", sum(agent_cpu), max(agent_cpu)))
    return ", ".join(parts) + f"; box {cpu['box_busy']:.0%} busy"


def _concurrent_figures(
    label: str, conditions: str, latencies: list[float], wall: float, cpu: dict[str, float]
) -> list[Figure]:
    rate = len(latencies) / wall
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    ceiling = 1 / cpu["controller"]
    return [
        Figure(
            f"/clear {CONCURRENCY} concurrent, {label}",
            f"{conditions}; {len(latencies)} clears",
            f"{rate:.0f} clears/s; p50/p99 {ms(p50)} / {ms(p99)}",
            f">= {TARGET_RATE:.0f} clears/s",
            rate >= TARGET_RATE,
            {"clears_per_s": rate, "p50_s": p50, "p99_s": p99, **_cpu_data(cpu)},
        ),
        Figure("  CPU per clear (us)", f"{CONCURRENCY} concurrent, {label}", _cpu_text(cpu, rate)),
        Figure(
            "  controller CPU per clear",
            f"{label}; ceiling = 1 / it, on one free core (est.)",
            f"{cpu['controller'] * 1e6:.0f} us -> ceiling {ceiling:.0f} clears/s",
            f">= {TARGET_RATE:.0f} clears/s",
            ceiling >= TARGET_RATE,
            {"controller_cpu_s_per_clear": cpu["controller"], "clears_per_s": ceiling},
        ),
    ]


def run(quick: bool) -> list[Figure]:
    sequential, concurrent = (300, 2048) if quick else (2000, 8192)
    requests = [_request(instance) for instance in INSTANCES]
    figures: list[Figure] = []
    with (
        workdir() as tmp,
        redis_server(tmp) as server,
        controller(server.url, tmp) as ctl,
        agents(server.url, INSTANCES, tmp) as agent_procs,
    ):
        procs = {
            "controller": ctl.pid,
            **{f"agent{n}": p.pid for n, p in enumerate(agent_procs)},
            "redis": server.pid,
            "client": os.getpid(),
        }
        with _http.runner() as loop:
            one, four = _Load(ctl.url, requests[:1], 1), _Load(ctl.url, requests, CONCURRENCY)
            loop.run(one.measure(50, {}))  # warm up
            note(f"clear: {sequential} sequential clears")
            latencies, _, cpu = loop.run(one.measure(sequential, _only(procs, ["agent0"])))
            p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
            figures.append(
                Figure(
                    "/clear p50/p99 sequential",
                    f"1 keep-alive connection, 1 agent process; {sequential} clears",
                    f"{ms(p50)} / {ms(p99)}",
                    "p50 <= 2 ms",
                    p50 <= TARGET_P50_S,
                    {"p50_s": p50, "p99_s": p99, **_cpu_data(cpu)},
                )
            )
            figures.append(Figure("  CPU per clear (us)", "sequential", _cpu_text(cpu)))

            note(f"clear: {concurrent} clears from {CONCURRENCY} concurrent tasks, all to 1 instance")
            latencies, wall, cpu = loop.run(
                _Load(ctl.url, requests[:1], CONCURRENCY).measure(concurrent, _only(procs, ["agent0"]))
            )
            figures += _concurrent_figures(
                "1 instance", f"{CONCURRENCY} connections, 1 agent process, 1 controller process", latencies, wall, cpu
            )

            note(f"clear: {concurrent} clears from {CONCURRENCY} concurrent tasks over {len(INSTANCES)} instances")
            latencies, wall, cpu = loop.run(four.measure(concurrent, procs))
            figures += _concurrent_figures(
                f"{len(INSTANCES)} instances",
                f"{CONCURRENCY} connections, {len(INSTANCES)} agent processes round-robin per request, "
                "1 controller process",
                latencies,
                wall,
                cpu,
            )
    return figures


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
