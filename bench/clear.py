"""`/clear` round trip over HTTP: sequential, then 32 concurrent, through real processes.

A clear is the bus's full path: the controller XADDs a command to the instance's stream, the
agent (a separate `kvbus agent` process, as in production) reads it, clears its backend, flushes
its index and XADDs the result to the controller's result stream, which the controller's reader
task hands back to the waiting request. The agent holds nothing, so this is the bus's own cost;
bench/clear_cost.py measures clearing 100k chunks.

CPU time per clear of each process (controller, agent, redis, this client) shows where the time
goes, which matters on a small box where all of them share the cores: controller CPU per clear
bounds what one controller process can serve.
"""

from __future__ import annotations

import asyncio
import os
import time

import httpx

from bench._harness import Figure, Proc, agent, controller, cpu_seconds, main, ms, note, percentile, redis_server, workdir
from kvbus.shared.locations import Location

INSTANCE = "bench-clear"
BODY = {"instance_id": INSTANCE, "location": str(Location.CPU)}
CONCURRENCY = 32
TARGET_P50_S = 0.002
TARGET_RATE = 2000.0


def _sequential(base_url: str, count: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=base_url, timeout=10) as http:
        for _ in range(count):
            started = time.perf_counter()
            response = http.post("/clear", json=BODY)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
    return latencies


def _concurrent(base_url: str, count: int) -> tuple[list[float], float]:
    """`count` clears from CONCURRENCY tasks on one AsyncClient; returns latencies and wall time."""
    async def measure() -> tuple[list[float], float]:
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        latencies: list[float] = []
        async with httpx.AsyncClient(base_url=base_url, timeout=10, limits=limits) as http:
            async def worker(n: int) -> None:
                for _ in range(n):
                    started = time.perf_counter()
                    response = await http.post("/clear", json=BODY)
                    latencies.append(time.perf_counter() - started)
                    response.raise_for_status()
            await asyncio.gather(*(worker(CONCURRENCY) for _ in range(CONCURRENCY)))  # warm every connection
            latencies.clear()
            started = time.perf_counter()
            await asyncio.gather(*(worker(count // CONCURRENCY) for _ in range(CONCURRENCY)))
            return latencies, time.perf_counter() - started
    return asyncio.run(measure())


def _cpu_per_clear(procs: dict[str, int], before: dict[str, float], count: int) -> dict[str, float]:
    return {name: (cpu_seconds(pid) - before[name]) / count for name, pid in procs.items()}


def _cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds * 1e6:.0f}" for name, seconds in cpu.items())


def run(quick: bool) -> list[Figure]:
    sequential, concurrent = (300, 1024) if quick else (2000, 6400)
    figures: list[Figure] = []
    with workdir() as tmp, redis_server(tmp) as server, controller(server.url, tmp) as ctl, \
            agent(server.url, INSTANCE, tmp) as agt:
        procs = _pids(ctl, agt, server)
        _sequential(ctl.url, 50)  # warm up
        note(f"clear: {sequential} sequential clears")
        before = {name: cpu_seconds(pid) for name, pid in procs.items()}
        latencies = _sequential(ctl.url, sequential)
        cpu = _cpu_per_clear(procs, before, sequential)
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        figures.append(Figure(
            "/clear p50/p99 sequential", f"1 client, keep-alive, 1 agent process; {sequential} clears",
            f"{ms(p50)} / {ms(p99)}", "p50 <= 2 ms", p50 <= TARGET_P50_S,
            {"p50_s": p50, "p99_s": p99, **{f"cpu_s_per_clear_{k}": v for k, v in cpu.items()}},
        ))
        figures.append(Figure("  CPU per clear (us)", "sequential", _cpu_text(cpu)))

        note(f"clear: {concurrent} clears from {CONCURRENCY} concurrent tasks")
        before = {name: cpu_seconds(pid) for name, pid in procs.items()}
        latencies, wall = _concurrent(ctl.url, concurrent)
        cpu = _cpu_per_clear(procs, before, len(latencies))
        rate = len(latencies) / wall
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        figures.append(Figure(
            "/clear p50/p99 concurrent", f"{CONCURRENCY} tasks, 1 AsyncClient, 1 agent; {len(latencies)} clears",
            f"{ms(p50)} / {ms(p99)}", "-", None, {"p50_s": p50, "p99_s": p99},
        ))
        figures.append(Figure(
            "/clear throughput", f"{CONCURRENCY} concurrent, one controller process",
            f"{rate:.0f} clears/s", f">= {TARGET_RATE:.0f} clears/s", rate >= TARGET_RATE,
            {"clears_per_s": rate, **{f"cpu_s_per_clear_{k}": v for k, v in cpu.items()}},
        ))
        figures.append(Figure("  CPU per clear (us)", f"{CONCURRENCY} concurrent", _cpu_text(cpu)))
        ceiling = 1 / cpu["controller"]
        figures.append(Figure(
            "  controller ceiling", "1 / controller CPU per clear (one core, uncontended)",
            f"{ceiling:.0f} clears/s", f">= {TARGET_RATE:.0f} clears/s", ceiling >= TARGET_RATE,
            {"clears_per_s": ceiling},
        ))
    return figures


def _pids(ctl: Proc, agt: Proc, server: Proc) -> dict[str, int]:
    return {"controller": ctl.pid, "agent": agt.pid, "redis": server.pid, "client": os.getpid()}


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
