"""The same measurements on one redis-server and on a Redis Cluster (3 masters, a replica each), side by side.

Each backend gets its own controller process (kvbus finds the cluster from the one node its
redis_url names) and, in turn:

- `/clear` over HTTP to real `kvbus agent` processes, one per target instance (32; 8 with
  --quick): sequential over one keep-alive connection, round-robin over the instances, then
  32 in flight round-robin over them. Every answer is checked (200, `num_tokens` 0, an event id).
- index ingest: one IndexWriter admitting 200k chunks (100k with --quick), as bench/ingest.py.
- `/lookup` p50/p99 over HTTP as bench/lookup.py measures it, with the fleet grown to 10, 100,
  1000 and 10,000 instances of 1000 chunks each (disjoint prompts; three instances hold the
  looked-up 8192-token prompt: two all of it, one its first half). Every answer's layout is
  checked. At 1000 and 10,000 instances, `GET /metrics` and `GET /dashboard.json` p50 too (each
  answer must name every instance). Redis CPU per lookup is the CPU time of the masters' processes
  over the run, summed, divided by the lookups.
- the shared-prefix case: 1000 instances hold the first 8 chunks of another prompt and one more
  holds all 32 of it, so the lookup walks 1001 candidates and reports them all (target: p50 <= 3 ms,
  p99 <= 8 ms).
- Redis memory per indexed chunk: `used_memory` summed over the masters, its growth over the fleet's
  population divided by the chunks indexed (replicas hold as much again).

Only the clear's targets are processes. The lookup fleet is written in-process exactly as agents
write it (bench/_harness.py `register` and `publish`: a Registration and an IndexWriter per
instance, through a kvbus redis_conn client, so each key goes to the node serving its slot), with
each instance's alive key set to last an hour since no heartbeat runs for it. With --quick the
instances past the first 1000 hold 100 chunks each instead of 1000, which keeps the populate to
seconds; a full run writes all 10M chunks (about 1 GB per copy).

Everything runs on one box: the cluster's six nodes, the controller, the agents and this load
generator share its cores, so the cluster's figures show what routing costs, not what scaling out
gains.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
import torch

from bench import _http, clear, ingest, lookup
from bench._harness import (
    CHUNK_SIZE,
    Figure,
    agents,
    controller,
    cpu_seconds,
    entries,
    main,
    ms,
    note,
    percentile,
    publish,
    random_prompt,
    redis_cluster,
    redis_server,
    register,
    unrelated_entries,
    workdir,
)
from bench._harness import ingest as ingest_entries
from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.registration import Registration
from kvbus.shared import redis_conn

BACKENDS = ("single", "cluster")
INSTANCE_COUNTS = (10, 100, 1000, 10_000)
SCRAPE_COUNTS = (1000, 10_000)
CHUNKS_PER_INSTANCE = 1000
QUICK_CHUNKS_PAST_1000 = 100  # --quick: instances 1000..9999 hold this many chunks
HOLDERS = lookup.HOLDERS
SHARED_CHUNKS = 8  # the shared-prefix case: this many chunks of its prompt on each of SHARED_HOLDERS instances
SHARED_HOLDERS = 1000
CONCURRENCY = 32
LOOKUP_TARGET_P50_S = lookup.TARGET_P50_S
SHARED_TARGET_P50_S, SHARED_TARGET_P99_S = 0.003, 0.008
POPULATE_BATCH = 100  # instances whose filler chunks are drawn at once: 10M entries at once would need GBs


@dataclass
class Backend:
    name: str
    url: str
    masters: dict[int, int]  # port -> pid of each node serving slots

    def used_memory(self) -> int:
        total = 0
        for port in self.masters:
            with redis.Redis(port=port, socket_timeout=5) as client:
                total += int(client.info("memory")["used_memory"])
        return total

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.masters.values())


@contextlib.contextmanager
def _backend(name: str, tmp: Any) -> Iterator[Backend]:
    if name == "single":
        with redis_server(tmp) as server:
            port = int(server.url.rsplit(":", 1)[1].split("/")[0])
            yield Backend(name, server.url, {port: server.pid})
    else:
        with redis_cluster(tmp) as cluster:
            yield Backend(name, cluster.url, {port: cluster.nodes[port].pid for port in cluster.masters()})


def _instance(number: int) -> str:
    return f"bench-{number:05d}"


def _populate(
    client: Any, rng: torch.Generator, numbers: range, prompt: list[IndexEntry], chunks: int, fleet: list[Registration]
) -> int:
    """Register, heartbeat once and publish instances `numbers` as their agents would (their registrations
    appended to `fleet`); returns the chunks indexed."""
    indexed = 0
    for start in range(numbers.start, numbers.stop, POPULATE_BATCH):
        batch = range(start, min(start + POPULATE_BATCH, numbers.stop))
        filler = unrelated_entries(rng, len(batch) * chunks)
        for offset, number in enumerate(batch):
            instance_id = _instance(number)
            held = prompt[: HOLDERS.get(number, 0)]
            # No heartbeat thread runs for these instances: their alive keys last an hour.
            registration = register(client, instance_id, ttl_s=3600)
            registration.heartbeat()
            fleet.append(registration)
            held = held + filler[offset * chunks : (offset + 1) * chunks - len(held)]
            publish(client, instance_id, held)
            indexed += len(held)
    return indexed


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def _scrape(base_url: str, path: str, samples: int, instances: int) -> tuple[list[float], int]:
    """`samples` sequential GETs of `path`, each of which must be a 200; returns their latencies and how many
    named every instance. /metrics answers without the fleet (kvbus_redis_up 0) when reading it takes longer
    than half of redis_timeout, and the dashboard answers a 503: those are counted, not raised."""
    conn = await _http.Connection.open(base_url)
    request = _get(path)
    latencies, complete = [], 0
    try:
        for n in range(samples + 1):  # the first one warms up
            started = time.perf_counter()
            status, body = await conn.send(request)
            elapsed = time.perf_counter() - started
            if status not in (200, 503):
                raise _http.HTTPError(f"GET {path}: HTTP {status}: {body[:300]!r}")
            if status == 200 and path == "/dashboard.json":
                named = len(_http.check_json(status, body)["instances"])
            else:
                named = body.count(b"kvbus_instance_alive{")
            if n:
                latencies.append(elapsed)
                complete += named >= instances
    finally:
        await conn.close()
    return latencies, complete


def _lookup(
    loop: Any, backend: Backend, ctl: Any, request: bytes, samples: int, expected: dict[str, int]
) -> dict[str, float]:
    warmup = max(samples // 20, 2)
    redis_before = backend.cpu()
    latencies, ctl_cpu, busy = loop.run(lookup._over_http(ctl.url, request, samples, warmup, expected, ctl.pid))
    redis_cpu = (backend.cpu() - redis_before) / (samples + warmup)
    return {
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "controller_cpu_s": ctl_cpu,
        "redis_cpu_s": redis_cpu,
        "box_busy": busy,
        "layout_size": len(expected),
    }


def _clears(loop: Any, backend: Backend, ctl: Any, tmp: Any, quick: bool) -> dict[str, dict[str, float]]:
    count = 8 if quick else CONCURRENCY
    sequential, concurrent = (300, 2048) if quick else (1000, 8192)
    instances = [f"bench-clear-{n:02d}" for n in range(count)]
    requests = [clear._request(instance) for instance in instances]
    note(f"cluster[{backend.name}]: starting {count} agent processes")
    with agents(backend.url, instances, tmp) as procs:
        pids = {
            "controller": ctl.pid,
            "client": os.getpid(),
            **{f"redis{port}": pid for port, pid in backend.masters.items()},
            **{f"agent{n}": p.pid for n, p in enumerate(procs)},
        }
        loop.run(clear._Load(ctl.url, requests, 1).measure(50, {}))  # warm up
        note(f"cluster[{backend.name}]: {sequential} sequential clears over {count} instances")
        seq, _, seq_cpu = loop.run(clear._Load(ctl.url, requests, 1).measure(sequential, pids))
        note(f"cluster[{backend.name}]: {concurrent} clears, {CONCURRENCY} in flight over {count} instances")
        par, wall, par_cpu = loop.run(clear._Load(ctl.url, requests, CONCURRENCY).measure(concurrent, pids))

    def summary(latencies: list[float], cpu: dict[str, float]) -> dict[str, float]:
        return {
            "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99),
            "controller_cpu_s": cpu["controller"],
            "redis_cpu_s": sum(v for k, v in cpu.items() if k.startswith("redis")),
            "agents_cpu_s": sum(v for k, v in cpu.items() if k.startswith("agent")),
            "box_busy": cpu["box_busy"],
            "instances": count,
        }

    return {"sequential": summary(seq, seq_cpu), "concurrent": {**summary(par, par_cpu), "rate": len(par) / wall}}


def _measure(name: str, quick: bool) -> dict[str, Any]:
    """Every figure of one backend, keyed by row."""
    rng = torch.Generator().manual_seed(1)
    tokens = random_prompt(rng).tolist()
    shared_tokens = random_prompt(rng).tolist()
    request = _http.encode_post("/lookup", {"tokens": tokens})
    shared_request = _http.encode_post("/lookup", {"tokens": shared_tokens})
    expected = {_instance(n): chunks * CHUNK_SIZE for n, chunks in HOLDERS.items()}
    prompt = entries(tokens)
    rows: dict[str, Any] = {}
    with workdir() as tmp, _backend(name, tmp) as backend, controller(backend.url, tmp) as ctl, _http.runner() as loop:
        rows["clear"] = _clears(loop, backend, ctl, tmp, quick)
        total = 100_000 if quick else 200_000
        rows["ingest"] = {"chunks_per_s": total / ingest.measure(backend.url, total, "bench-cluster-ingest")}
        client = redis_conn.connect(backend.url)
        try:
            memory_before, indexed, populated = backend.used_memory(), 0, 0
            registrations: list[Registration] = []
            for count in INSTANCE_COUNTS:
                chunks = QUICK_CHUNKS_PAST_1000 if quick and count > 1000 else CHUNKS_PER_INSTANCE
                started = time.perf_counter()
                indexed += _populate(client, rng, range(populated, count), prompt, chunks, registrations)
                note(
                    f"cluster[{name}]: fleet now {count} instances, {indexed} chunks "
                    f"(+{count - populated} instances in {time.perf_counter() - started:.1f} s)"
                )
                populated = count
                samples = (300 if quick else 2000) if count <= 1000 else (200 if quick else 1000)
                rows[f"lookup {count}"] = {**_lookup(loop, backend, ctl, request, samples, expected), "chunks": chunks}
                if count in SCRAPE_COUNTS:
                    # What a scrape shows is what heartbeats left (a controller may drop entries silent for
                    # reap_after), so every instance beats once, as its agent would have within a second.
                    started = time.perf_counter()
                    for registration in registrations:
                        registration.heartbeat()
                    note(f"cluster[{name}]: {count} heartbeats in {time.perf_counter() - started:.1f} s")
                    scrapes = (5 if quick else 20) if count <= 1000 else (3 if quick else 10)
                    for path in ("/metrics", "/dashboard.json"):
                        latencies, complete = loop.run(_scrape(ctl.url, path, scrapes, count))
                        rows[f"{path} {count}"] = {
                            "p50_s": percentile(latencies, 50),
                            "samples": scrapes,
                            "complete": complete,
                        }
            memory = backend.used_memory() - memory_before
            rows["memory"] = {"bytes_per_chunk": memory / indexed, "chunks": indexed, "used_memory_delta": memory}
            rows["shared"] = _shared(loop, backend, ctl, client, shared_tokens, shared_request, quick)
        finally:
            client.close()
    return rows


def _shared(
    loop: Any, backend: Backend, ctl: Any, client: Any, tokens: list[int], request: bytes, quick: bool
) -> dict[str, float]:
    """1000 instances hold the prompt's first 8 chunks and one more all 32: 1001 candidates, all reported."""
    prompt = entries(tokens)
    ingest_entries(client, _instance(0), prompt)
    for number in range(1, SHARED_HOLDERS + 1):
        ingest_entries(client, _instance(number), prompt[:SHARED_CHUNKS])
    expected = {_instance(0): len(prompt) * CHUNK_SIZE}
    expected |= {_instance(n): SHARED_CHUNKS * CHUNK_SIZE for n in range(1, SHARED_HOLDERS + 1)}
    note(f"cluster[{backend.name}]: shared prefix, {len(expected)} candidates")
    return _lookup(loop, backend, ctl, request, 100 if quick else 500, expected)


def _pair(results: dict[str, dict[str, Any]], row: str, text: Any) -> str:
    return "; ".join(f"{name} {text(results[name][row])}" for name in BACKENDS if row in results[name])


def _lookup_text(row: dict[str, float]) -> str:
    return (
        f"{ms(row['p50_s'])} / {ms(row['p99_s'])} (ctl CPU {ms(row['controller_cpu_s'])}, "
        f"Redis CPU {row['redis_cpu_s'] * 1e6:.0f} us, box {row['box_busy']:.0%})"
    )


def _figures(results: dict[str, dict[str, Any]], quick: bool) -> list[Figure]:
    figures: list[Figure] = []

    def data(row: str) -> dict[str, float]:
        return {f"{name}_{k}": v for name in BACKENDS for k, v in results[name].get(row, {}).items()}

    for count in INSTANCE_COUNTS:
        row = f"lookup {count}"
        chunks = results["single"][row]["chunks"]
        met = all(results[n][row]["p50_s"] <= LOOKUP_TARGET_P50_S for n in BACKENDS)
        figures.append(
            Figure(
                "/lookup p50/p99 (HTTP)",
                f"{count} inst x {chunks:.0f} chunks; layout {len(HOLDERS)} inst, checked",
                _pair(results, row, _lookup_text),
                "p50 <= 2 ms",
                met,
                data(row),
            )
        )
    shared = [results[n]["shared"] for n in BACKENDS]
    figures.append(
        Figure(
            "/lookup shared prefix",
            f"{SHARED_HOLDERS} inst hold the prompt's first {SHARED_CHUNKS} chunks, 1 all 32; "
            f"layout {SHARED_HOLDERS + 1} inst, checked",
            _pair(results, "shared", _lookup_text),
            "p50 <= 3 ms, p99 <= 8 ms",
            all(r["p50_s"] <= SHARED_TARGET_P50_S and r["p99_s"] <= SHARED_TARGET_P99_S for r in shared),
            data("shared"),
        )
    )
    clears = {n: results[n]["clear"] for n in BACKENDS}
    agents_n = clears["single"]["sequential"]["instances"]
    figures.append(
        Figure(
            "/clear p50/p99 sequential",
            f"1 connection, round-robin over {agents_n:.0f} agent processes",
            "; ".join(
                f"{n} {ms(c['sequential']['p50_s'])} / {ms(c['sequential']['p99_s'])} "
                f"(Redis CPU {c['sequential']['redis_cpu_s'] * 1e6:.0f} us)"
                for n, c in clears.items()
            ),
            "p50 <= 2 ms",
            all(c["sequential"]["p50_s"] <= clear.TARGET_P50_S for c in clears.values()),
            {f"{n}_{k}": v for n, c in clears.items() for k, v in c["sequential"].items()},
        )
    )
    figures.append(
        Figure(
            f"/clear {CONCURRENCY} in flight",
            f"round-robin over {agents_n:.0f} agent processes, 1 controller",
            "; ".join(
                f"{n} {c['concurrent']['rate']:.0f}/s, p50/p99 {ms(c['concurrent']['p50_s'])} / "
                f"{ms(c['concurrent']['p99_s'])} (ctl CPU {c['concurrent']['controller_cpu_s'] * 1e6:.0f} us, "
                f"Redis {c['concurrent']['redis_cpu_s'] * 1e6:.0f} us a clear; box {c['concurrent']['box_busy']:.0%})"
                for n, c in clears.items()
            ),
            f">= {clear.TARGET_RATE:.0f} clears/s",
            all(c["concurrent"]["rate"] >= clear.TARGET_RATE for c in clears.values()),
            {f"{n}_{k}": v for n, c in clears.items() for k, v in c["concurrent"].items()},
        )
    )
    figures.append(
        Figure(
            "index ingest",
            f"1 IndexWriter, {100 if quick else 200}k chunks",
            _pair(results, "ingest", lambda r: f"{r['chunks_per_s']:,.0f} chunks/s"),
            f">= {ingest.TARGET_RATE:,.0f} chunks/s",
            all(results[n]["ingest"]["chunks_per_s"] >= ingest.TARGET_RATE for n in BACKENDS),
            data("ingest"),
        )
    )
    figures.append(
        Figure(
            "Redis memory per indexed chunk",
            f"used_memory growth summed over masters / {results['single']['memory']['chunks']:,.0f} chunks "
            "(the fleet with its registrations)",
            _pair(results, "memory", lambda r: f"{r['bytes_per_chunk']:.0f} B"),
            "<= 150 B",
            all(results[n]["memory"]["bytes_per_chunk"] <= 150 for n in BACKENDS),
            data("memory"),
        )
    )
    for count in SCRAPE_COUNTS:
        for path in ("/metrics", "/dashboard.json"):
            row = f"{path} {count}"
            figures.append(
                Figure(
                    f"{path} scrape p50",
                    f"{count} instances; every instance named, checked; {results['single'][row]['samples']:.0f} seq",
                    _pair(results, row, lambda r: f"{ms(r['p50_s'])} (fleet in {r['complete']}/{r['samples']})"),
                    "every answer names the fleet",
                    all(results[n][row]["complete"] == results[n][row]["samples"] for n in BACKENDS),
                    data=data(row),
                )
            )
    return figures


def run(quick: bool) -> list[Figure]:
    results = {}
    for name in BACKENDS:
        started = time.perf_counter()
        results[name] = _measure(name, quick)
        note(f"cluster[{name}]: done in {time.perf_counter() - started:.0f} s")
    return _figures(results, quick)


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0] if __doc__ else None)
