"""Run every kvbus benchmark, each against its own redis-server and processes, and print one table.

    python -m bench.run_all [--quick] [--json PATH] [--only NAME...]     (or: python -m bench ...)

Absolute figures depend on the box and on whatever else runs on it; the CPU rows say where the
time went. Nothing here asserts: a figure that misses its target is marked MISS.
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from collections.abc import Callable

from bench import (
    capacity,
    clear,
    clear_cost,
    cluster,
    commands,
    engine_prefill,
    guard_cost,
    ingest,
    lmcache_workers,
    lookup,
    memory,
    scrape,
    vllm_prefill,
    vs_lmcache,
)
from bench._harness import Figure, busy_fraction, cpu_jiffies, print_table, write_json

BENCHMARKS: dict[str, Callable[[bool], list[Figure]]] = {
    "lookup": lookup.run,
    "clear": clear.run,
    "clear_cost": clear_cost.run,
    "ingest": ingest.run,
    "memory": memory.run,
    "commands": commands.run,
    "engine_prefill": engine_prefill.run,
    "vllm_prefill": vllm_prefill.run,
    "lmcache_workers": lmcache_workers.run,
    "guard_cost": guard_cost.run,
    "cluster": cluster.run,
    "capacity": capacity.run,
    "scrape": scrape.run,
    "vs_lmcache": vs_lmcache.run,
}
# Run only when named with --only: LMCache's own controller beside kvbus takes minutes and .venv-lmcache.
OPT_IN = {"vs_lmcache"}


def _host_load(seconds: float = 1.0) -> Figure:
    """How busy the box was just before the run: other load on the box skews every figure."""
    before = cpu_jiffies()
    time.sleep(seconds)
    busy = busy_fraction(before, cpu_jiffies())
    return Figure(
        "host load before the run",
        f"{os.cpu_count()} CPUs; busy share over {seconds:g} s",
        f"{busy:.0%}" + (" (other load: figures will suffer)" if busy > 0.2 else ""),
        data={"box_busy": busy, "cpus": float(os.cpu_count() or 0)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer samples and smaller data, for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run just these benchmarks")
    args = parser.parse_args()
    figures: list[Figure] = [_host_load()]
    started = time.perf_counter()
    for name, run in BENCHMARKS.items():
        if (args.only and name not in args.only) or (not args.only and name in OPT_IN):
            continue
        print(f"== {name}", flush=True)
        begun = time.perf_counter()
        try:
            figures.extend(run(args.quick))
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            traceback.print_exc()
            figures.append(Figure(name, "benchmark failed; traceback above", "-", met=False))
        print(f"   {time.perf_counter() - begun:.0f} s", flush=True)
    print(f"\nkvbus benchmarks{' (quick)' if args.quick else ''}, {time.perf_counter() - started:.0f} s in all\n")
    print_table(figures)
    if args.json:
        write_json(args.json, figures, args.quick)


if __name__ == "__main__":
    main()
