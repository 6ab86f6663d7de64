"""`GET /metrics`: Prometheus text for one controller process.

Two kinds of series. This process's own traffic (requests, commands answered, lookups) is
counted by an ASGI middleware from each response, so the route handlers stay unaware of it.
The fleet (index sizes, command backlogs, heartbeats, what agents hold) is read from Redis on
each scrape, from the entries each worker's heartbeat leaves in the fleet hashes (fleet.read_entries):
any replica reports the same, values are at most one heartbeat old, and a scrape reads 32 keys
whatever the fleet's size.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvbus.controller import fleet
from kvbus.controller.compat_metrics import LMCacheGauges
from kvbus.controller.errors import REDIS_DOWN, AgentFailed, AgentTimeout, Refused
from kvbus.controller.lmcache.bridge import Bridge
from kvbus.shared.config import KVBusConfig
from kvbus.shared.messages import CommandKind
from kvbus.shared.records import BackendStats

# Each command is served at the path of its kind's name (/clear, /pin, ...).
COMMAND_PATHS = {f"/{kind}": str(kind) for kind in CommandKind}
# What became of a command the bus carried; other errors (bad request, unknown instance) never reached it.
_OUTCOMES = {AgentTimeout.code: "timeout", AgentFailed.code: "failed", Refused.code: "refused"}
OUTCOMES = ("ok", *_OUTCOMES.values())
_UNMATCHED = "<unmatched>"  # one label for every path no route serves, so scanners cannot grow the series
# Lookups answer in ms; commands wait up to command_timeout (5 s by default) for agents.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# What leaves a scrape without the fleet: Redis down, or stalled past the scrape's bound.
_NO_FLEET: tuple[type[Exception], ...] = (*REDIS_DOWN, TimeoutError)


class _LookupAnswer(msgspec.Struct):
    layout_info: dict[str, msgspec.Raw]  # only whether it is empty matters; the values stay undecoded


class _ErrorAnswer(msgspec.Struct):
    error: str = ""


class Metrics:
    """The counters of one app; each app has its own registry, so several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # prometheus_client's process_*, python_gc_* and python_info, which LMCache's /metrics has too.
        for default in (ProcessCollector, GCCollector, PlatformCollector):
            default(registry=self.registry)
        labels = ["method", "path", "status"]
        self.requests = Counter(
            "kvbus_http_requests",
            "HTTP requests answered, by route template, method and status",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "kvbus_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template, method and status",
            labels,
            buckets=_BUCKETS,
            registry=self.registry,
        )
        # (method, path, status) -> its request counter and latency histogram: labels() costs ~6 us a call.
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.commands = Counter(
            "kvbus_commands",
            "Commands this controller sent and answered, by kind and outcome (ok, timeout, failed, refused)",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.lookups = Counter(
            "kvbus_lookups",
            "Lookups this controller answered: hit when any instance holds a prefix, miss when layout_info is empty",
            ["result"],
            registry=self.registry,
        )
        # Series that exist from the start make rate() and ratios correct from the first increment; kept, as
        # the request series are, so that no request asks labels() for them.
        self._commands = {
            (kind, outcome): self.commands.labels(kind, outcome)
            for kind in COMMAND_PATHS.values()
            for outcome in OUTCOMES
        }
        self._lookups = {hit: self.lookups.labels("hit" if hit else "miss") for hit in (True, False)}

    def observe(self, method: str, path: str, status: int, seconds: float, body: bytes) -> None:
        series = self._series.get((method, path, status))
        if series is None:  # paths are route templates and methods few: the cache stays small
            series = self._series[method, path, status] = (
                self.requests.labels(method, path, status),
                self.latency.labels(method, path, status),
            )
        requests, latency = series
        requests.inc()
        latency.observe(seconds)
        if path == "/lookup" and status == 200:
            try:
                hit = bool(msgspec.json.decode(body, type=_LookupAnswer).layout_info)
            except msgspec.DecodeError:
                return  # not the answer shape this counts; the request itself is counted above
            self._lookups[hit].inc()
        elif (kind := COMMAND_PATHS.get(path)) is not None:
            outcome = "ok" if status == 200 else _OUTCOMES.get(_error_code(body))
            if outcome is not None:
                self._commands[kind, outcome].inc()

    def lookup_counts(self) -> tuple[int, int]:
        """(hits, misses) since this process started."""

        def value(result: str) -> int:
            return int(self.registry.get_sample_value("kvbus_lookups_total", {"result": result}) or 0)

        return value("hit"), value("miss")

    def command_counts(self) -> dict[str, dict[str, int]]:
        """kind -> outcome -> commands this process answered since it started."""
        counts: dict[str, dict[str, int]] = {}
        for family in self.commands.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts.setdefault(sample.labels["kind"], {})[sample.labels["outcome"]] = int(sample.value)
        return counts


def _error_code(body: bytes) -> str:
    try:
        return msgspec.json.decode(body, type=_ErrorAnswer).error
    except msgspec.DecodeError:
        return ""


def _wants_body(path: str, status: int) -> bool:
    return (path == "/lookup" and status == 200) or (path in COMMAND_PATHS and status != 200)


class MetricsMiddleware:
    """Counts and times every HTTP request by route template; reads the few answers whose outcome it counts."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the outermost error handler answers when an exception escapes the app
        body = bytearray()
        capture = False

        async def sending(message: Message) -> None:
            nonlocal status, capture
            if message["type"] == "http.response.start":
                status = message["status"]
                capture = _wants_body(_path(scope), status)
            elif message["type"] == "http.response.body" and capture:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.observe(scope["method"], _path(scope), status, time.perf_counter() - started, bytes(body))


def _path(scope: Scope) -> str:
    # The router records the route it matched in the scope, which this middleware shares.
    route = scope.get("route")
    return str(route.path) if route is not None and hasattr(route, "path") else _UNMATCHED


# key -> (name, help) of each fleet series, in the order they are served; instance and worker labels first.
_FLEET_SERIES: dict[str, tuple[str, str]] = {
    "chunks": (
        "kvbus_index_chunks",
        "Chunks indexed per instance, worker (rank) and location (HLEN of the rank's index hash), "
        "as of the worker's last heartbeat",
    ),
    "alive": (
        "kvbus_instance_alive",
        "1 while one of the instance's workers heartbeated within heartbeat_ttl (what keeps its heartbeat key); "
        "lookups skip instances without it",
    ),
    "registered": ("kvbus_workers_registered", "Workers registered per instance"),
    "workers_alive": ("kvbus_workers_alive", "Workers whose last heartbeat is within heartbeat_ttl"),
    "heartbeat": ("kvbus_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat, by Redis's clock"),
    "unacked": (
        "kvbus_bus_unacked_commands",
        "Commands on the instance's stream the worker has not acked: read and pending, or not read yet; "
        "as of its last heartbeat",
    ),
    "lag": (
        "kvbus_bus_lag_seconds",
        "Age of the oldest command the worker had not acked at its last heartbeat, by Redis's clock; 0 when none",
    ),
    "held_chunks": ("kvbus_worker_chunks", "Chunks the worker's backend holds at a location, as of its last heartbeat"),
    "held_bytes": ("kvbus_worker_bytes", "Bytes the worker's backend uses at a location, as of its last heartbeat"),
    "capacity": ("kvbus_worker_capacity_bytes", "Capacity of the worker's backend at a location"),
}


def fleet_text(snapshot: fleet.Fleet | None, heartbeat_ttl_s: float) -> str:
    """The fleet's series in Prometheus's text format, written directly: prometheus_client's objects cost
    about 10 us a sample, over a second for 10,000 instances' hundred thousand samples. Counts are written
    as prometheus_client writes them (`3.0`)."""
    up = int(snapshot is not None)
    head = (
        "# HELP kvbus_redis_up 1 when this scrape read the fleet from Redis, 0 when Redis was unreachable "
        f"(the fleet series are then absent)\n# TYPE kvbus_redis_up gauge\nkvbus_redis_up {up}.0\n"
    )
    if snapshot is None:
        return head
    series: dict[str, list[str]] = {key: [] for key in _FLEET_SERIES}
    for instance in snapshot.instances:
        _add_instance(series, instance, snapshot.locations, heartbeat_ttl_s)
    parts = [head]
    for key, (name, help_text) in _FLEET_SERIES.items():
        parts.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
        parts.extend(series[key])
    return "".join(parts)


def _add_instance(series: dict[str, list[str]], instance: fleet.Instance, locations: list[str], ttl_s: float) -> None:
    name = f'instance_id="{_escaped(instance.instance_id)}"'
    series["alive"].append(f"kvbus_instance_alive{{{name}}} {int(instance.alive)}.0\n")
    series["registered"].append(f"kvbus_workers_registered{{{name}}} {len(instance.workers)}.0\n")
    alive = sum(w.alive(ttl_s) for w in instance.workers)
    series["workers_alive"].append(f"kvbus_workers_alive{{{name}}} {alive}.0\n")
    for worker in instance.workers:
        labels = f'{name},worker_id="{worker.worker_id}"'
        series["chunks"].extend(
            f'kvbus_index_chunks{{{labels},location="{_escaped(location)}"}} {worker.index.get(location, 0)}.0\n'
            for location in locations
        )
        if worker.heartbeat_age_s is not None:
            series["heartbeat"].append(f"kvbus_worker_heartbeat_age_seconds{{{labels}}} {worker.heartbeat_age_s!r}\n")
        if worker.backlog is not None:
            series["unacked"].append(f"kvbus_bus_unacked_commands{{{labels}}} {worker.backlog.unacked}.0\n")
            series["lag"].append(f"kvbus_bus_lag_seconds{{{labels}}} {worker.backlog.oldest_age_s!r}\n")
        _add_stats(series, labels, worker.record.stats or {})


def _add_stats(series: dict[str, list[str]], labels: str, stats: dict[str, BackendStats]) -> None:
    for location, held in stats.items():
        at = f'{labels},location="{_escaped(location)}"'
        series["held_chunks"].append(f"kvbus_worker_chunks{{{at}}} {held.chunks}.0\n")
        series["held_bytes"].append(f"kvbus_worker_bytes{{{at}}} {held.bytes}.0\n")
        series["capacity"].append(f"kvbus_worker_capacity_bytes{{{at}}} {held.capacity_bytes}.0\n")


def _escaped(label_value: str) -> str:
    """A label value as the text format quotes it."""
    if "\\" in label_value or '"' in label_value or "\n" in label_value:
        return label_value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return label_value


async def metrics(request: Request) -> Response:
    own: Metrics = request.app.state.metrics
    config: KVBusConfig = request.app.state.config
    snapshot: fleet.Fleet | None
    try:
        # Half the request's budget (deadlines.py), so that a scrape of a stalled Redis still answers.
        async with asyncio.timeout(request.app.state.config.redis_timeout / 2):
            snapshot = await fleet.read_entries(
                request.app.state.redis, heartbeat_ttl_s=config.heartbeat_ttl, reap_after_s=config.reap_after
            )
    except _NO_FLEET:
        snapshot = None  # this process's own counters still tell something; kvbus_redis_up says why the rest is gone
    scrape = CollectorRegistry()
    bridge: Bridge = request.app.state.bridge
    scrape.register(LMCacheGauges(snapshot, bridge.messages()))  # LMCache's own gauge names, beside kvbus's
    text = generate_latest(own.registry) + fleet_text(snapshot, config.heartbeat_ttl).encode() + generate_latest(scrape)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


ROUTES = [Route("/metrics", metrics, methods=["GET"])]
