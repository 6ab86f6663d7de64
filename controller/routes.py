"""The HTTP endpoints: parse, call the index or the bus, answer. Errors are raised, never built here."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kvbus.controller import events, openapi, outcomes
from kvbus.controller.bus import CommandBus, new_event_id
from kvbus.controller.errors import BodyTooLarge, InvalidField, Refused
from kvbus.controller.lookup import PrefixIndex
from kvbus.controller.registry import Registry
from kvbus.controller.registry import key_stats as registry_stats
from kvbus.controller.schemas import (
    CheckFinishRequest,
    ClearRequest,
    CompressRequest,
    InstanceRequest,
    LookupRequest,
    MoveRequest,
    PinRequest,
    QueryInstanceRequest,
    QueryWorkerInfoRequest,
    check_method,
    check_token_count,
    parse,
)
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
    return JSONResponse(
        {
            "event_id": new_event_id("Lookup"),
            "layout_info": {m.instance_id: [str(m.location), m.num_tokens] for m in matches},
        }
    )


async def clear(request: Request) -> JSONResponse:
    body = parse(await _body(request), ClearRequest)
    return await _command(request, body.instance_id, CommandKind.CLEAR, "Clear", location=str(body.location))


async def pin(request: Request) -> JSONResponse:
    body = parse(await _body(request), PinRequest)
    _check_tokens(request, body.tokens)
    return await _command(
        request, body.instance_id, CommandKind.PIN, "Pin", location=str(body.location), tokens=body.tokens
    )


async def unpin(request: Request) -> JSONResponse:
    body = parse(await _body(request), PinRequest)
    _check_tokens(request, body.tokens)
    return await _command(
        request, body.instance_id, CommandKind.UNPIN, "Unpin", location=str(body.location), tokens=body.tokens
    )


async def compress(request: Request) -> JSONResponse:
    return await _compression(request, CommandKind.COMPRESS, "Compress")


async def decompress(request: Request) -> JSONResponse:
    return await _compression(request, CommandKind.DECOMPRESS, "Decompress")


async def _compression(request: Request, kind: CommandKind, prefix: str) -> JSONResponse:
    body = parse(await _body(request), CompressRequest)
    check_method(body.method)
    _check_tokens(request, body.tokens)
    return await _command(
        request, body.instance_id, kind, prefix, location=str(body.location), tokens=body.tokens, method=body.method
    )


async def _command(request: Request, instance_id: str, kind: CommandKind, prefix: str, **fields: Any) -> JSONResponse:
    bus: CommandBus = request.app.state.bus
    event_id = new_event_id(prefix)
    started = time.perf_counter()
    answer = outcomes.token_count(await bus.request(instance_id, kind, event_id, **fields))
    log.info(
        "%s %s %s %s: %d tokens in %.1f ms",
        kind,
        event_id,
        instance_id,
        fields.get("location", ""),
        answer["num_tokens"],
        (time.perf_counter() - started) * 1000,
    )
    return JSONResponse(answer)


async def move(request: Request) -> JSONResponse:
    registry: Registry = request.app.state.registry
    body = parse(await _body(request), MoveRequest)
    _check_tokens(request, body.tokens)
    (source, source_location), (dest, dest_location) = body.old_position, body.new_position
    if source == dest and source_location == dest_location:
        raise InvalidField("old_position and new_position are the same", field="new_position")
    peers: dict[str, str] = {}
    if dest != source:
        (sending,), (receiving,) = await registry.instances(source), await registry.instances(dest)
        if len(sending.workers) != len(receiving.workers):
            raise Refused(
                f"{source!r} has {len(sending.workers)} workers and {dest!r} {len(receiving.workers)}: "
                "chunks move rank to rank, so both need the same number"
            )
        for sender, receiver in zip(sending.workers, receiving.workers, strict=True):
            if not receiver["peer_init_url"]:
                raise Refused(
                    f"worker {receiver['worker_id']} of {dest!r} has no peer endpoint: set p2p_host and "
                    "p2p_init_ports in its config"
                )
            peers[str(sender["worker_id"])] = receiver["peer_init_url"]
    return await _command(
        request,
        source,
        CommandKind.MOVE,
        "Move",
        location=str(source_location),
        tokens=body.tokens,
        dest_location=str(dest_location),
        peers=peers,
        should_copy=body.should_copy,
    )


async def health(request: Request) -> JSONResponse:
    bus: CommandBus = request.app.state.bus
    body = parse(await _body(request), InstanceRequest)
    return JSONResponse(
        outcomes.health(await bus.request(body.instance_id, CommandKind.HEALTH, new_event_id("health")))
    )


async def check_finish(request: Request) -> JSONResponse:
    body = parse(await _body(request), CheckFinishRequest)
    return JSONResponse(await events.check(request.app.state.redis, body.event_id))


async def query_worker_info(request: Request) -> JSONResponse:
    registry: Registry = request.app.state.registry
    body = parse(await _body(request), QueryWorkerInfoRequest)
    instances = await registry.instances(None if body.instance_id == "all" else body.instance_id)
    wanted = None if body.worker_ids is None else set(body.worker_ids)
    infos = [w for i in instances for w in i.workers if wanted is None or w["worker_id"] in wanted]
    return JSONResponse({"event_id": new_event_id("QueryWorkerInfo"), "worker_infos": infos})


async def query_instance(request: Request) -> JSONResponse:
    registry: Registry = request.app.state.registry
    body = parse(await _body(request), QueryInstanceRequest)
    return JSONResponse(
        {"event_id": body.event_id or new_event_id("QueryInst"), "res": await registry.instance_at(body.ip)}
    )


async def key_stats(request: Request) -> JSONResponse:
    registry: Registry = request.app.state.registry
    return JSONResponse(registry_stats(await registry.instances()))


async def workers(request: Request) -> JSONResponse:
    registry: Registry = request.app.state.registry
    instance_id = request.query_params.get("instance_id")
    worker_id = request.query_params.get("worker_id")
    if worker_id is not None:
        if instance_id is None:
            raise InvalidField("worker_id needs instance_id", field="instance_id")
        if not worker_id.isdigit():
            raise InvalidField(f"worker_id must be a non-negative integer, got {worker_id!r}", field="worker_id")
        return JSONResponse(await registry.worker(instance_id, int(worker_id)))
    instances = await registry.instances(instance_id)
    listed = [{**w, "key_count": i.key_count} for i in instances for w in i.workers]
    return JSONResponse({"workers": listed, "total_count": len(listed)})


def _check_tokens(request: Request, tokens: list[int]) -> None:
    config: KVBusConfig = request.app.state.config
    check_token_count(tokens, config.max_lookup_tokens)


_SPEC = openapi.spec()


async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(_SPEC)


async def healthz(request: Request) -> JSONResponse:
    bus: CommandBus = request.app.state.bus
    await request.app.state.redis.ping()
    return JSONResponse({"status": "ok", "controller_id": bus.controller_id})


ROUTES = [
    Route("/lookup", lookup, methods=["POST"]),
    Route("/clear", clear, methods=["POST"]),
    Route("/pin", pin, methods=["POST"]),
    Route("/unpin", unpin, methods=["POST"]),
    Route("/compress", compress, methods=["POST"]),
    Route("/decompress", decompress, methods=["POST"]),
    Route("/move", move, methods=["POST"]),
    Route("/health", health, methods=["POST"]),
    Route("/check_finish", check_finish, methods=["POST"]),
    Route("/query_worker_info", query_worker_info, methods=["POST"]),
    Route("/query_instance", query_instance, methods=["POST"]),
    Route("/controller/key-stats", key_stats, methods=["GET"]),
    Route("/controller/workers", workers, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
]
