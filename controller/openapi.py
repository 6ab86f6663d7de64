"""GET /openapi.json: every endpoint, its request schema (generated from the very structs that
validate requests) and its answers, errors included."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from kvbus import __version__
from kvbus.controller import errors, schemas

_TOKENS = {
    "type": "object",
    "required": ["event_id", "num_tokens"],
    "properties": {
        "event_id": {"type": "string"},
        "num_tokens": {"type": "integer"},
        "num_tokens_per_worker": {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "description": "present only when the instance's ranks disagree",
        },
    },
}
_WORKER = {
    "type": "object",
    "properties": {
        "instance_id": {"type": "string"},
        "worker_id": {"type": "integer"},
        "ip": {"type": "string"},
        "port": {"type": ["integer", "null"]},
        "peer_init_url": {"type": ["string", "null"]},
        "registration_time": {"type": "number"},
        "last_heartbeat_time": {"type": "number"},
    },
}
_ERROR = {
    "type": "object",
    "required": ["detail", "error"],
    "properties": {
        "detail": {"type": "string"},
        "error": {"type": "string"},
        "field": {"type": "string"},
        "event_id": {"type": "string"},
    },
}


@dataclass(frozen=True)
class _Endpoint:
    path: str
    method: str
    summary: str
    body: type[msgspec.Struct] | None
    answer: dict[str, Any]
    errors: tuple[type[errors.APIError], ...] = ()
    media_type: str = "application/json"
    answers_without_redis: bool = False  # never a 503


_BODY_ERRORS = (errors.MalformedBody, errors.InvalidField, errors.BodyTooLarge)
_COMMAND_ERRORS = (*_BODY_ERRORS, errors.UnknownInstance, errors.Refused, errors.AgentFailed, errors.AgentTimeout)

ENDPOINTS = (
    _Endpoint(
        "/lookup",
        "post",
        "Which live instances hold a prefix of these tokens, each with its own match",
        schemas.LookupRequest,
        {
            "type": "object",
            "properties": {
                "event_id": {"type": "string"},
                "layout_info": {
                    "type": "object",
                    "additionalProperties": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
                },
            },
        },
        _BODY_ERRORS,
    ),
    _Endpoint(
        "/clear",
        "post",
        "Free every unpinned chunk the instance holds at a location",
        schemas.ClearRequest,
        _TOKENS,
        _COMMAND_ERRORS,
    ),
    _Endpoint(
        "/pin",
        "post",
        "Pin the held prefix of tokens: it survives eviction and clear",
        schemas.PinRequest,
        _TOKENS,
        _COMMAND_ERRORS,
    ),
    _Endpoint("/unpin", "post", "Unpin the held prefix of tokens", schemas.PinRequest, _TOKENS, _COMMAND_ERRORS),
    _Endpoint(
        "/compress",
        "post",
        "Compress the held prefix of tokens (all chunks if tokens is empty)",
        schemas.CompressRequest,
        _TOKENS,
        (*_COMMAND_ERRORS, errors.UnknownMethod),
    ),
    _Endpoint(
        "/decompress",
        "post",
        "Decompress the held prefix of tokens (all chunks if tokens is empty)",
        schemas.CompressRequest,
        _TOKENS,
        (*_COMMAND_ERRORS, errors.UnknownMethod),
    ),
    _Endpoint(
        "/move",
        "post",
        "Move (or copy) the held prefix of tokens (every chunk if tokens is empty) to "
        "another location or instance; "
        "checksummed, and the source drops its copy only once the destination holds it",
        schemas.MoveRequest,
        _TOKENS,
        _COMMAND_ERRORS,
    ),
    _Endpoint(
        "/health",
        "post",
        "Each worker's health code (0 healthy, -1 memory check failed, -1001 error)",
        schemas.InstanceRequest,
        {
            "type": "object",
            "properties": {
                "event_id": {"type": "string"},
                "error_codes": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
        },
        _COMMAND_ERRORS,
    ),
    _Endpoint(
        "/check_finish",
        "post",
        "The status of any event: pending, finished, failed or expired",
        schemas.CheckFinishRequest,
        {
            "type": "object",
            "properties": {
                "event_id": {"type": "string"},
                "status": {"enum": ["pending", "finished", "failed", "expired"]},
                "kind": {"type": "string"},
                "instance_id": {"type": "string"},
                "workers": {"type": "object"},
            },
        },
        (*_BODY_ERRORS, errors.UnknownEvent),
    ),
    _Endpoint(
        "/query_worker_info",
        "post",
        "Registered workers, read live",
        schemas.QueryWorkerInfoRequest,
        {
            "type": "object",
            "properties": {"event_id": {"type": "string"}, "worker_infos": {"type": "array", "items": _WORKER}},
        },
        (*_BODY_ERRORS, errors.UnknownInstance),
    ),
    _Endpoint(
        "/query_instance",
        "post",
        "The instance with a worker at an IP",
        schemas.QueryInstanceRequest,
        {"type": "object", "properties": {"event_id": {"type": "string"}, "res": {"type": ["string", "null"]}}},
        _BODY_ERRORS,
    ),
    _Endpoint(
        "/controller/key-stats",
        "get",
        "Indexed chunks per instance",
        None,
        {
            "type": "object",
            "properties": {
                "total_key_count": {"type": "integer"},
                "total_instance_count": {"type": "integer"},
                "total_worker_count": {"type": "integer"},
                "instances": {"type": "array"},
            },
        },
    ),
    _Endpoint(
        "/controller/workers",
        "get",
        "One worker (instance_id and worker_id given) or a list",
        None,
        {"type": "object"},
        (errors.InvalidField, errors.UnknownInstance, errors.UnknownWorker),
    ),
    _Endpoint(
        "/healthz",
        "get",
        "The controller and its Redis are up",
        None,
        {"type": "object", "properties": {"status": {"const": "ok"}, "controller_id": {"type": "string"}}},
    ),
    _Endpoint(
        "/metrics",
        "get",
        "Prometheus metrics: requests, command outcomes, lookups, index sizes, bus lag",
        None,
        {"type": "string"},
        media_type="text/plain",
        answers_without_redis=True,
    ),
    _Endpoint(
        "/dashboard.json",
        "get",
        "What the dashboard shows: instances, workers, storage, recent commands",
        None,
        {"type": "object"},
    ),
    _Endpoint(
        "/",
        "get",
        "The live dashboard page",
        None,
        {"type": "string"},
        media_type="text/html",
        answers_without_redis=True,
    ),
)


def spec() -> dict[str, Any]:
    bodies = [e.body for e in ENDPOINTS if e.body is not None]
    refs, components = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    by_body = dict(zip(bodies, refs, strict=True))
    components["Error"] = _ERROR
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        operation: dict[str, Any] = {
            "summary": endpoint.summary,
            "responses": {"200": {"description": "OK", "content": {endpoint.media_type: {"schema": endpoint.answer}}}},
        }
        if endpoint.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": by_body[endpoint.body]}},
            }
        for error in (*endpoint.errors, *(() if endpoint.answers_without_redis else (errors.BusUnavailable,))):
            described = operation["responses"].setdefault(
                str(error.status_code),
                {
                    "description": "",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            )
            described["description"] = "; ".join(filter(None, (described["description"], error.code)))
        paths.setdefault(endpoint.path, {})[endpoint.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kvbus controller",
            "version": __version__,
            "description": "LMCache's controller API over a Redis stream bus",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
