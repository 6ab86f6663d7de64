"""The HTTP endpoints: parse, call the index or the bus, answer. Errors are raised, never built here."""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kvbus.controller.bus import CommandBus, new_event_id
from kvbus.controller.errors import BodyTooLarge
from kvbus.controller.lookup import PrefixIndex
from kvbus.controller.schemas import ClearRequest, LookupRequest, check_token_count, parse
from kvbus.shared.config import KVBusConfig
from kvbus.shared.messages import CommandKind

log = logging.getLogger("kvbus.controller")

MAX_BODY_BYTES = 16 * 1024 * 1024


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body of {declared} bytes exceeds {MAX_BODY_BYTES} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def lookup(request: Request) -> JSONResponse:
    config: KVBusConfig = request.app.state.config
    index: PrefixIndex = request.app.state.index
    body = parse(await _body(request), LookupRequest)
    check_token_count(body.tokens, config.max_lookup_tokens)
    matches = await index.lookup(body.tokens)
    return JSONResponse({
        "event_id": new_event_id("Lookup"),
        "layout_info": {m.instance_id: [str(m.location), m.num_tokens] for m in matches},
    })


async def clear(request: Request) -> JSONResponse:
    bus: CommandBus = request.app.state.bus
    body = parse(await _body(request), ClearRequest)
    event_id = new_event_id("Clear")
    started = time.perf_counter()
    result = await bus.request(body.instance_id, CommandKind.CLEAR, event_id, location=str(body.location))
    log.info("clear %s %s %s: %d tokens in %.1f ms", event_id, body.instance_id, body.location,
             result.num_tokens, (time.perf_counter() - started) * 1000)
    return JSONResponse({"event_id": event_id, "num_tokens": result.num_tokens})


async def healthz(request: Request) -> JSONResponse:
    bus: CommandBus = request.app.state.bus
    await request.app.state.redis.ping()
    return JSONResponse({"status": "ok", "controller_id": bus.controller_id})


ROUTES = [
    Route("/lookup", lookup, methods=["POST"]),
    Route("/clear", clear, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
]
