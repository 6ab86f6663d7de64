"""`GET /`: a live dashboard, a static page that polls `GET /dashboard.json`.

The JSON is read from Redis on every call: the fleet as its workers' last heartbeats left it
(fleet.read_entries, as /metrics reads it: at most one heartbeat old, and 32 keys whatever the
fleet's size), the newest commands from the journal with /check_finish's status for each, and the
newest agent lifecycle events. Lookup and command counts are this controller process's own, since start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from kvbus.controller import command_records, fleet
from kvbus.controller.answers import (
    DashboardAnswer,
    DashboardInstance,
    DashboardWorker,
    LifecycleView,
    LookupCounts,
    RecentCommand,
    WorkerOutcome,
    respond,
)
from kvbus.controller.bus import CommandBus
from kvbus.controller.metrics import Metrics
from kvbus.shared import keys, redis_conn
from kvbus.shared.config import KVBusConfig
from kvbus.shared.flat_fields import DecodeError
from kvbus.shared.records import (
    JournaledCommand,
    JournaledResult,
    JournalEntry,
    LifecycleEntry,
    decode_journal,
)

STATIC = ("kvbus.controller", "static")
RECENT_COMMANDS = 20
# Commands are found among this many of the newest journal entries (each command has one result per
# worker). A bound on entries, not commands, bounds the read: an entry may carry a long token list.
JOURNAL_WINDOW = 100
AGENT_EVENTS = 10
# The page loads nothing from elsewhere and builds every string into the DOM as text; this makes
# the browser enforce the first and refuse any script that is not the page's own.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(_PAGE, headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"})


async def dashboard_json(request: Request) -> Response:
    client: redis_conn.AsyncClient = request.app.state.redis
    metrics: Metrics = request.app.state.metrics
    bus: CommandBus = request.app.state.bus
    config: KVBusConfig = request.app.state.config
    ttl_s = config.heartbeat_ttl
    snapshot, (commands, lifecycle) = await asyncio.gather(
        fleet.read_entries(client, heartbeat_ttl_s=ttl_s, reap_after_s=config.reap_after), _recent(client)
    )
    hits, misses = metrics.lookup_counts()
    answer = DashboardAnswer(
        controller_id=bus.controller_id,
        now=snapshot.now_s,
        locations=snapshot.locations,
        instances=[_instance(instance, snapshot.locations, ttl_s) for instance in snapshot.instances],
        lookups=LookupCounts(hits, misses, hits / (hits + misses) if hits + misses else None),
        commands_answered=metrics.command_counts(),
        recent_commands=commands,
        agent_events=lifecycle,
    )
    return respond(answer, headers={"Cache-Control": "no-store"})


def _instance(instance: fleet.Instance, locations: list[str], ttl_s: float) -> DashboardInstance:
    index = instance.index  # summed over the instance's workers: each rank has its own index
    return DashboardInstance(
        instance_id=instance.instance_id,
        alive=instance.alive,
        index_chunks={location: index.get(location, 0) for location in locations},
        workers_registered=len(instance.workers),
        workers_alive=sum(w.alive(ttl_s) for w in instance.workers),
        workers=[_worker(w, ttl_s) for w in instance.workers],
    )


def _worker(worker: fleet.Worker, ttl_s: float) -> DashboardWorker:
    record = worker.record
    return DashboardWorker(
        worker_id=worker.worker_id,
        ip=record.ip,
        hostname=record.hostname,
        pid=record.pid,
        heartbeat_age_s=worker.heartbeat_age_s,
        alive=worker.alive(ttl_s),
        stats=record.stats,
        unacked_commands=worker.backlog.unacked if worker.backlog else None,
        oldest_unacked_age_s=worker.backlog.oldest_age_s if worker.backlog else None,
    )


async def _recent(client: redis_conn.AsyncClient) -> tuple[list[RecentCommand], list[LifecycleView]]:
    pipe = client.pipeline(transaction=False)
    pipe.xrevrange(keys.JOURNAL, count=JOURNAL_WINDOW)
    pipe.xrevrange(keys.LIFECYCLE, count=AGENT_EVENTS)
    (journal, lifecycle), now_ms = await asyncio.gather(pipe.execute(), redis_conn.server_ms(client))
    entries = [(entry_id, entry) for entry_id, fields in journal if (entry := _journal_entry(fields)) is not None]
    sent = [(entry_id, e) for entry_id, e in entries if isinstance(e, JournaledCommand)][:RECENT_COMMANDS]
    pipe = client.pipeline(transaction=False)
    for _, command in sent:
        pipe.hgetall(keys.command_record(command.event_id))
    records = await pipe.execute()
    results = _journaled_results(entry for _, entry in entries)
    commands = [
        _command(entry_id, command, record, results, now_ms)
        for (entry_id, command), record in zip(sent, records, strict=True)
    ]
    return commands, [view for entry_id, fields in lifecycle if (view := _lifecycle(entry_id, fields)) is not None]


def _journaled_results(entries: Iterable[JournalEntry]) -> dict[str, dict[str, WorkerOutcome]]:
    """event id -> worker id -> the outcome its journaled result tells."""
    results: dict[str, dict[str, WorkerOutcome]] = {}
    for entry in entries:
        if isinstance(entry, JournaledResult):
            results.setdefault(entry.event_id, {})[str(entry.worker_id)] = command_records.outcome(entry)
    return results


def _journal_entry(fields: dict[str, str]) -> JournalEntry | None:
    try:
        return decode_journal(fields)
    except DecodeError:
        return None  # written by another version, or damaged: the page shows what it can


def _command(
    entry_id: str,
    command: JournaledCommand,
    fields: dict[str, str],
    journaled: dict[str, dict[str, WorkerOutcome]],
    now_ms: int,
) -> RecentCommand:
    status: str
    record = command_records.read(fields)
    if record is not None:
        described = command_records.describe(command.event_id, record, now_ms)
        status, workers = str(described.status), described.workers or {}
    else:
        # Past retention /check_finish no longer knows the event; the journal still has its results.
        status, workers = "unknown", journaled.get(command.event_id, {})
    # What the command's answer said: the smallest count of the workers that did it, as /clear answers.
    answered = [w.num_tokens for w in workers.values() if w.status == "ok" and isinstance(w.num_tokens, int)]
    return RecentCommand(
        event_id=command.event_id,
        time=_entry_ms(entry_id) / 1000,
        kind=str(command.kind),
        instance_id=command.instance_id,
        location=command.location,
        method=command.method,
        status=status,
        num_tokens=min(answered) if answered else None,
        workers=workers,
    )


def _lifecycle(entry_id: str, fields: dict[str, str]) -> LifecycleView | None:
    try:
        entry = LifecycleEntry.decode(fields)
    except DecodeError:
        return None
    return LifecycleView(_entry_ms(entry_id) / 1000, str(entry.kind), entry.instance_id, entry.worker_id, entry.detail)


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


_PAGE = resources.files(STATIC[0]).joinpath(STATIC[1], "dashboard.html").read_text("utf-8")

ROUTES = [
    Route("/", page, methods=["GET"]),
    Route("/dashboard.json", dashboard_json, methods=["GET"]),
    Mount("/static", StaticFiles(packages=[STATIC]), name="static"),
]
