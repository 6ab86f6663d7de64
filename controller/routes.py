"""The HTTP endpoints: parse, call the index or the bus, answer. Errors are raised, never built here."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvbus.controller import command_records, deadlines, event_ids, fleet, openapi, outcomes, registry
from kvbus.controller.answers import (
    HealthzAnswer,
    LookupAnswer,
    QueryInstanceAnswer,
    QueryWorkerInfoAnswer,
    respond,
)
from kvbus.controller.bus import CommandBus
from kvbus.controller.errors import BodyTooLarge, Refused, UnknownInstance, UnknownWorker
from kvbus.controller.event_ids import Operation
from kvbus.controller.lookup import PrefixIndex
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
    check_move,
    check_token_count,
    check_wire_tokens,
    parse,
    refusal,
)
from kvbus.controller.tickets import issue_tickets
from kvbus.controller.validation import Invalid, validate_query_int
from kvbus.shared.config import KVBusConfig
from kvbus.shared.messages import CommandKind
from kvbus.shared.records import MoveTicket

log = logging.getLogger("kvbus.controller")

MAX_BODY_BYTES = 16 * 1024 * 1024


async def _body(request: Request) -> bytes:
    """The request's body, read off the ASGI messages themselves: a body almost always comes in one message,
    and Request.stream's async generator cost more than reading it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body of {declared} bytes exceeds {MAX_BODY_BYTES} bytes")
    chunks = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)  # one chunk comes back as itself, uncopied


async def _read(request: Request, kind: type[Any]) -> Any:
    return parse(await _body(request), request.headers.get("content-type"), kind)


async def lookup(request: Request) -> Response:
    config: KVBusConfig = request.app.state.config
    index: PrefixIndex = request.app.state.index
    body: LookupRequest = await _read(request, LookupRequest)
    check_token_count(body.tokens, config.max_lookup_tokens)
    matches = await index.lookup(body.tokens) if body.tokens else []
    return respond(
        LookupAnswer(
            event_id=event_ids.new(Operation.LOOKUP),
            layout_info={m.instance_id: (str(m.location), m.num_tokens) for m in matches},
        )
    )


async def clear(request: Request) -> Response:
    body: ClearRequest = await _read(request, ClearRequest)
    return await _command(request, body.instance_id, CommandKind.CLEAR, location=body.location)


async def pin(request: Request) -> Response:
    body: PinRequest = await _read(request, PinRequest)
    _check_tokens(request, body.tokens)
    return await _command(request, body.instance_id, CommandKind.PIN, location=body.location, tokens=body.tokens)


async def unpin(request: Request) -> Response:
    body: PinRequest = await _read(request, PinRequest)
    _check_tokens(request, body.tokens)
    return await _command(request, body.instance_id, CommandKind.UNPIN, location=body.location, tokens=body.tokens)


async def compress(request: Request) -> Response:
    return await _compression(request, CommandKind.COMPRESS)


async def decompress(request: Request) -> Response:
    return await _compression(request, CommandKind.DECOMPRESS)


async def _compression(request: Request, kind: CommandKind) -> Response:
    body: CompressRequest = await _read(request, CompressRequest)
    check_method(body.method)
    _check_tokens(request, body.tokens)
    return await _command(
        request, body.instance_id, kind, location=body.location, tokens=body.tokens or [], method=body.method
    )


async def _command(request: Request, instance_id: str, kind: CommandKind, **fields: Any) -> Response:
    bus: CommandBus = request.app.state.bus
    event_id = event_ids.new(Operation.of(kind))
    started = time.perf_counter()
    outcome = await bus.request(
        instance_id, kind, event_id, extended=lambda until: deadlines.extend(request.scope, until), **fields
    )
    answer = outcomes.token_count(outcome)
    # Not info: at thousands of commands a second one line each cost the controller an eighth of its CPU, and
    # every command and result is already in the journal stream. Failures are logged where they are mapped.
    log.debug(
        "%s %s %s %s: %d tokens in %.1f ms",
        kind,
        event_id,
        instance_id,
        fields.get("location", ""),
        answer.num_tokens,
        (time.perf_counter() - started) * 1000,
    )
    return respond(answer)


async def move(request: Request) -> Response:
    body: MoveRequest = await _read(request, MoveRequest)
    _check_tokens(request, body.tokens)
    check_move(body)
    (source, source_location), (dest, dest_location) = body.old_position, body.new_position
    tokens = body.tokens or []
    peers, tickets = await _peers(request, source, dest, dest_location, len(tokens)) if dest != source else ({}, {})
    return await _command(
        request,
        source,
        CommandKind.MOVE,
        location=source_location,
        tokens=tokens,
        dest_location=dest_location,
        peers=peers,
        tickets=tickets,
        should_copy=bool(body.should_copy),
    )


async def _peers(
    request: Request, source: str, dest: str, dest_location: str, max_tokens: int
) -> tuple[dict[str, str], dict[str, str]]:
    """Each source worker's destination peer endpoint (chunks move rank to rank), and the token of the
    ticket that gets its chunks in, written just before the command goes out."""
    snapshot = await fleet.read(request.app.state.redis, backlogs=False)
    sending, receiving = registry.instance(snapshot, source), registry.instance(snapshot, dest)
    if len(sending.workers) != len(receiving.workers):
        raise Refused(
            f"{source!r} has {len(sending.workers)} workers and {dest!r} {len(receiving.workers)}: "
            "chunks move rank to rank, so both need the same number"
        )
    peers: dict[str, str] = {}
    grants: dict[str, MoveTicket] = {}
    for sender, receiver in zip(sending.workers, receiving.workers, strict=True):
        if not receiver.record.peer_init_url:
            raise Refused(
                f"worker {receiver.worker_id} of {dest!r} has no peer endpoint: set p2p_host and "
                "p2p_init_ports in its config"
            )
        peers[str(sender.worker_id)] = receiver.record.peer_init_url
        grants[str(sender.worker_id)] = MoveTicket(
            source_instance=source,
            source_worker=sender.worker_id,
            worker_id=receiver.worker_id,
            location=dest_location,
            max_tokens=max_tokens,
        )
    bus: CommandBus = request.app.state.bus
    return peers, await issue_tickets(request.app.state.redis, dest, grants, ttl_ms=int(bus.timeout_s * 1000))


async def health(request: Request) -> Response:
    bus: CommandBus = request.app.state.bus
    body: InstanceRequest = await _read(request, InstanceRequest)
    event_id = event_ids.new(Operation.HEALTH)
    return respond(outcomes.health(await bus.request(body.instance_id, CommandKind.HEALTH, event_id)))


async def check_finish(request: Request) -> Response:
    body: CheckFinishRequest = await _read(request, CheckFinishRequest)
    return respond(await command_records.check(request.app.state.redis, body.event_id))


async def query_worker_info(request: Request) -> Response:
    """As LMCache: an unknown instance or worker id is left out (an empty list, not a 404), and an empty
    `worker_ids` means every worker, as null does."""
    body: QueryWorkerInfoRequest = await _read(request, QueryWorkerInfoRequest)
    only = None if body.instance_id == "all" else body.instance_id
    snapshot = await _registration_order(request, only)
    return respond(
        QueryWorkerInfoAnswer(
            event_id=event_ids.new(Operation.QUERY_WORKER_INFO),
            worker_infos=registry.worker_infos(snapshot, body.worker_ids or None),
        )
    )


async def query_instance(request: Request) -> Response:
    body: QueryInstanceRequest = await _read(request, QueryInstanceRequest)
    snapshot = await fleet.read(request.app.state.redis, backlogs=False)
    return respond(
        QueryInstanceAnswer(
            event_id=event_ids.new(Operation.QUERY_INSTANCE),  # LMCache answers with its own, whatever was sent
            res=registry.instance_at(snapshot, body.ip),
        )
    )


async def key_stats(request: Request) -> Response:
    return respond(registry.key_stats(await _registration_order(request)))


async def workers(request: Request) -> Response:
    """LMCache's three forms: every worker; an instance's (`instance_id`); one (`instance_id` and `worker_id`).
    `worker_id` alone is ignored, as LMCache ignores it, but must be an integer all the same."""
    instance_id = request.query_params.get("instance_id")
    worker_id = _query_int(request, "worker_id")
    snapshot = await _registration_order(request, instance_id)
    if instance_id is None:
        return respond(registry.workers(snapshot))
    found = snapshot.instance(instance_id)
    if worker_id is not None:
        if found is None or found.worker(worker_id) is None:
            error = UnknownWorker if found is not None else UnknownInstance
            raise error(f"Worker ({instance_id}, {worker_id}) not found", instance_id=instance_id)
        return respond(registry.worker(snapshot, instance_id, worker_id))
    if found is None:
        raise UnknownInstance(f"No workers found for instance {instance_id}", instance_id=instance_id)
    return respond(registry.workers(snapshot))


def _query_int(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    try:
        return None if value is None else validate_query_int(value, name)
    except Invalid as exc:
        raise refusal(exc.issues) from None


async def _registration_order(request: Request, only: str | None = None) -> fleet.Fleet:
    """The fleet with its instances in the order they registered (by their first worker), as LMCache lists them."""
    snapshot = await fleet.read(request.app.state.redis, only, backlogs=False)
    ordered = sorted(
        snapshot.instances,
        key=lambda i: (min((w.record.registration_time for w in i.workers), default=0.0), i.instance_id),
    )
    return dataclasses.replace(snapshot, instances=ordered)


def _check_tokens(request: Request, tokens: list[int] | None) -> None:
    config: KVBusConfig = request.app.state.config
    check_token_count(tokens, config.max_lookup_tokens)
    check_wire_tokens(tokens)


_SPEC = openapi.spec()


async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(_SPEC)


async def healthz(request: Request) -> Response:
    bus: CommandBus = request.app.state.bus
    await request.app.state.redis.ping()
    return respond(HealthzAnswer(status="ok", controller_id=bus.controller_id))


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
