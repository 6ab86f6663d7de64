"""GET /openapi.json: every endpoint, with its request and answer schemas generated from the very
Structs that validate requests (schemas.py) and build answers (answers.py), errors included."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from kvbus import __version__
from kvbus.controller import answers, errors, guard, schemas


@dataclass(frozen=True)
class _Endpoint:
    path: str
    method: str
    summary: str
    body: type[msgspec.Struct] | None
    # One Struct, or several of which the answer is one; None when the answer is not JSON (media_type says what).
    answer: type[msgspec.Struct] | tuple[type[msgspec.Struct], ...] | None
    errors: tuple[type[errors.APIError], ...] = ()
    media_type: str = "application/json"
    answers_without_redis: bool = False  # never a 503


_BODY_ERRORS = (
    errors.CrossOrigin,
    errors.UnsupportedMediaType,
    errors.UndecodableBody,
    errors.BodyTooDeep,
    errors.MalformedBody,
    errors.InvalidField,
    errors.BodyTooLarge,
)
_COMMAND_ERRORS = (*_BODY_ERRORS, errors.UnknownInstance, errors.Refused, errors.AgentFailed, errors.AgentTimeout)

ENDPOINTS = (
    _Endpoint(
        "/lookup",
        "post",
        "Which live instances hold a prefix of these tokens, each with its own match",
        schemas.LookupRequest,
        answers.LookupAnswer,
        _BODY_ERRORS,
    ),
    _Endpoint(
        "/clear",
        "post",
        "Free every unpinned chunk the instance holds at a location",
        schemas.ClearRequest,
        answers.TokenCountAnswer,
        _COMMAND_ERRORS,
    ),
    _Endpoint(
        "/pin",
        "post",
        "Pin the held prefix of tokens: it survives eviction and clear",
        schemas.PinRequest,
        answers.TokenCountAnswer,
        _COMMAND_ERRORS,
    ),
    _Endpoint(
        "/unpin",
        "post",
        "Unpin the held prefix of tokens",
        schemas.PinRequest,
        answers.TokenCountAnswer,
        _COMMAND_ERRORS,
    ),
    _Endpoint(
        "/compress",
        "post",
        "Compress the held prefix of tokens (all chunks if tokens is empty)",
        schemas.CompressRequest,
        answers.TokenCountAnswer,
        (*_COMMAND_ERRORS, errors.UnknownMethod),
    ),
    _Endpoint(
        "/decompress",
        "post",
        "Decompress the held prefix of tokens (all chunks if tokens is empty)",
        schemas.CompressRequest,
        answers.TokenCountAnswer,
        (*_COMMAND_ERRORS, errors.UnknownMethod),
    ),
    _Endpoint(
        "/move",
        "post",
        "Move (or copy) the held prefix of tokens (every chunk if tokens is empty) to another location or instance; "
        "checksummed, and the source drops its copy only once the destination holds it",
        schemas.MoveRequest,
        answers.TokenCountAnswer,
        _COMMAND_ERRORS,
    ),
    _Endpoint(
        "/health",
        "post",
        "Each worker's health code (0 healthy, -1 memory check failed, -1001 error)",
        schemas.InstanceRequest,
        answers.HealthAnswer,
        _COMMAND_ERRORS,
    ),
    _Endpoint(
        "/check_finish",
        "post",
        "The status of any event: pending, finished, failed or expired",
        schemas.CheckFinishRequest,
        answers.CheckFinishAnswer,
        (*_BODY_ERRORS, errors.UnknownEvent),
    ),
    _Endpoint(
        "/query_worker_info",
        "post",
        "Registered workers, read live",
        schemas.QueryWorkerInfoRequest,
        answers.QueryWorkerInfoAnswer,
        (*_BODY_ERRORS, errors.UnknownInstance),
    ),
    _Endpoint(
        "/query_instance",
        "post",
        "The instance with a worker at an IP",
        schemas.QueryInstanceRequest,
        answers.QueryInstanceAnswer,
        _BODY_ERRORS,
    ),
    _Endpoint("/controller/key-stats", "get", "Indexed chunks per instance", None, answers.KeyStatsAnswer),
    _Endpoint(
        "/controller/workers",
        "get",
        "One worker with its key_count (instance_id and worker_id given), or a list",
        None,
        (answers.WorkersAnswer, answers.WorkerInfo),
        (errors.InvalidField, errors.UnknownInstance, errors.UnknownWorker),
    ),
    _Endpoint("/healthz", "get", "The controller and its Redis are up", None, answers.HealthzAnswer),
    _Endpoint(
        "/metrics",
        "get",
        "Prometheus metrics: requests, command outcomes, lookups, index sizes, bus lag",
        None,
        None,
        media_type="text/plain",
        answers_without_redis=True,
    ),
    _Endpoint(
        "/dashboard.json",
        "get",
        "What the dashboard shows: instances, workers, storage, recent commands",
        None,
        answers.DashboardAnswer,
    ),
    _Endpoint("/", "get", "The live dashboard page", None, None, media_type="text/html", answers_without_redis=True),
)


def spec() -> dict[str, Any]:
    types = [t for e in ENDPOINTS for t in (e.body, *_answer_types(e)) if t is not None]
    refs, components = msgspec.json.schema_components(
        [*types, answers.ErrorAnswer], ref_template="#/components/schemas/{name}"
    )
    schema_of = dict(zip([*types, answers.ErrorAnswer], refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.path, {})[endpoint.method] = _operation(endpoint, schema_of)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kvbus controller",
            "version": __version__,
            "description": "LMCache's controller API over a Redis stream bus",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The controller's API token, when one is set (KVBUS_API_TOKEN or the yaml key "
                    "api_token); without one, no token is needed",
                }
            },
        },
    }


def _answer_types(endpoint: _Endpoint) -> tuple[type[msgspec.Struct], ...]:
    if endpoint.answer is None:
        return ()
    return endpoint.answer if isinstance(endpoint.answer, tuple) else (endpoint.answer,)


def _operation(endpoint: _Endpoint, schema_of: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    one_of = [schema_of[t] for t in _answer_types(endpoint)]
    answer = {"type": "string"} if not one_of else one_of[0] if len(one_of) == 1 else {"oneOf": one_of}
    operation: dict[str, Any] = {
        "summary": endpoint.summary,
        "responses": {"200": {"description": "OK", "content": {endpoint.media_type: {"schema": answer}}}},
    }
    if endpoint.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema_of[endpoint.body]}},
        }
    if endpoint.path not in guard.PUBLIC:
        operation["security"] = [{"bearer": []}, {}]  # {}: none, when the controller has no token set
    error_schema = {"application/json": {"schema": schema_of[answers.ErrorAnswer]}}
    redis_errors = () if endpoint.answers_without_redis else (errors.BusUnavailable, errors.RedisAuthFailed)
    token_errors = () if endpoint.path in guard.PUBLIC else (errors.Unauthorized,)
    for error in (*token_errors, *endpoint.errors, *redis_errors):
        described = operation["responses"].setdefault(
            str(error.status_code), {"description": "", "content": error_schema}
        )
        described["description"] = "; ".join(filter(None, (described["description"], error.code)))
    return operation
