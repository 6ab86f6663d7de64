"""`GET /`: a live dashboard, a static page that polls `GET /dashboard.json`.

The JSON is read from Redis on every call, like the worker queries: the fleet (fleet.py), the
newest commands from the journal with /check_finish's status for each, and the newest agent
lifecycle events. Lookup and command counts are this controller process's own, since start.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

import redis.asyncio
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from kvbus.controller import events, fleet
from kvbus.controller.bus import CommandBus
from kvbus.controller.metrics import Metrics
from kvbus.shared import keys

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


async def dashboard_json(request: Request) -> JSONResponse:
    client: redis.asyncio.Redis = request.app.state.redis
    metrics: Metrics = request.app.state.metrics
    bus: CommandBus = request.app.state.bus
    snapshot, (commands, lifecycle) = await asyncio.gather(fleet.read(client), _recent(client))
    hits, misses = metrics.lookup_counts()
    return JSONResponse(
        {
            "controller_id": bus.controller_id,
            **fleet.summary(snapshot, request.app.state.config.heartbeat_ttl),
            "lookups": {"hits": hits, "misses": misses, "hit_ratio": hits / (hits + misses) if hits + misses else None},
            "commands_answered": metrics.command_counts(),
            "recent_commands": commands,
            "agent_events": lifecycle,
        },
        headers={"Cache-Control": "no-store"},
    )


async def _recent(client: redis.asyncio.Redis) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    pipe = client.pipeline(transaction=False)
    pipe.xrevrange(keys.JOURNAL, count=JOURNAL_WINDOW)
    pipe.xrevrange(keys.EVENTS, count=AGENT_EVENTS)
    pipe.time()
    journal, lifecycle, (seconds, micros) = await pipe.execute()
    now_ms = seconds * 1000 + micros // 1000
    sent = [(entry_id, fields) for entry_id, fields in journal if fields.get("type") == "command"][:RECENT_COMMANDS]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for _, fields in journal:
        if fields.get("type") == "result":
            results.setdefault(fields.get("event_id", ""), {})[fields.get("worker_id", "?")] = _journal_result(fields)
    pipe = client.pipeline(transaction=False)
    for _, fields in sent:
        pipe.hgetall(keys.event(fields.get("event_id", "")))
    records = await pipe.execute()
    commands = [
        _command(entry_id, fields, record, results, now_ms)
        for (entry_id, fields), record in zip(sent, records, strict=True)
    ]
    return commands, [_agent_event(entry_id, fields) for entry_id, fields in lifecycle]


def _command(
    entry_id: str,
    fields: dict[str, str],
    record: dict[str, str],
    journaled: dict[str, dict[str, dict[str, Any]]],
    now_ms: int,
) -> dict[str, Any]:
    event_id = fields.get("event_id", "")
    if record:
        described = events.describe(event_id, record, now_ms)
        status, workers = str(described["status"]), described["workers"]
    else:
        # Past event_retention /check_finish no longer knows the event; the journal still has its results.
        status, workers = "unknown", journaled.get(event_id, {})
    answered = [w["num_tokens"] for w in workers.values() if w.get("status") == "ok"]
    return {
        "event_id": event_id,
        "time": _entry_ms(entry_id) / 1000,
        "kind": fields.get("kind", ""),
        "instance_id": fields.get("instance_id", ""),
        "location": fields.get("location", ""),
        "method": fields.get("method", ""),
        "status": status,
        # What the command's answer said: the smallest count of the workers that did it, as /clear answers.
        "num_tokens": min(answered) if answered else None,
        "workers": workers,
    }


def _journal_result(fields: dict[str, str]) -> dict[str, Any]:
    count = fields.get("num_tokens", "")
    return {
        "status": fields.get("status", ""),
        "num_tokens": int(count) if count.lstrip("-").isdigit() else None,
        "detail": fields.get("detail", ""),
    }


def _agent_event(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    return {
        "time": _entry_ms(entry_id) / 1000,
        "kind": fields.get("kind", ""),
        "instance_id": fields.get("instance_id", ""),
        "worker_id": fields.get("worker_id", ""),
        "detail": fields.get("detail", ""),
    }


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


_PAGE = resources.files(STATIC[0]).joinpath(STATIC[1], "dashboard.html").read_text("utf-8")

ROUTES = [
    Route("/", page, methods=["GET"]),
    Route("/dashboard.json", dashboard_json, methods=["GET"]),
    Mount("/static", StaticFiles(packages=[STATIC]), name="static"),
]
