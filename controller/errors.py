"""Every error a client can see, as data, and the one place that turns them into JSON responses.

Bodies keep FastAPI's `detail` field, which LMCache's clients read (for a 422, FastAPI's list of
pydantic issues; otherwise a sentence), and add a stable machine-readable `error` code plus
whatever context helps (field, event_id).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import msgspec
import redis
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from kvbus.controller.answers import ErrorAnswer, ValidationIssue, respond
from kvbus.shared.redis_conn import CLUSTER_MOVING, redacted

log = logging.getLogger("kvbus.controller")


# Redis failing as a whole, which the controller waits out (a 503 meanwhile): down, stalled, or refusing
# redis_url's user a command (NoPermissionError, a ResponseError, until an operator fixes the ACL).
REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.NoPermissionError,
    *CLUSTER_MOVING,
)


class APIError(Exception):
    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    headers: ClassVar[Mapping[str, str]] = {}  # what the answer carries beside its body

    def __init__(self, detail: str | list[ValidationIssue], **context: Any) -> None:
        super().__init__(detail if isinstance(detail, str) else detail[0].msg)
        self.detail = detail
        self.context = context


class UndecodableBody(APIError):
    """Bytes no JSON text decodes from (FastAPI's one 400 for a body, in its words)."""

    status_code = 400
    code = "undecodable_body"


class BodyTooDeep(APIError):
    """JSON nested deeper than any request needs: refused unread, since parsers recurse once per level."""

    status_code = 400
    code = "body_too_deep"


class MalformedBody(APIError):
    """The body as a whole: not JSON, empty, or not an object."""

    status_code = 422
    code = "malformed_body"


class InvalidField(APIError):
    """A field missing, ill-typed or out of kvbus's bounds."""

    status_code = 422
    code = "invalid_field"


class Unauthorized(APIError):
    """No bearer token, or not this controller's, where one is set (guard.py)."""

    status_code = 401
    code = "unauthorized"
    # RFC 6750: a 401 names the scheme the client should use.
    headers = {"WWW-Authenticate": 'Bearer realm="kvbus"'}


class CrossOrigin(APIError):
    """A browser request from a page of another origin to an endpoint that takes a body (guard.py)."""

    status_code = 403
    code = "cross_origin"


class UnsupportedMediaType(APIError):
    """A body not sent as JSON: a web page can send text/plain or a form to any origin without asking first."""

    status_code = 415
    code = "unsupported_media_type"


class BodyTooLarge(APIError):
    status_code = 413
    code = "body_too_large"


class UnknownInstance(APIError):
    status_code = 404
    code = "unknown_instance"


class UnknownMethod(APIError):
    status_code = 400
    code = "unknown_method"


class UnknownEvent(APIError):
    status_code = 404
    code = "unknown_event"


class UnknownWorker(APIError):
    status_code = 404
    code = "unknown_worker"


class Refused(APIError):
    """The agent cannot do this where asked (say, compress on a backend without compression)."""

    status_code = 400
    code = "refused"


class AgentFailed(APIError):
    status_code = 502
    code = "agent_failed"


class BusUnavailable(APIError):
    status_code = 503
    code = "redis_unavailable"


class RedisAuthFailed(APIError):
    """Redis refuses redis_url's credentials, or denies their user a command: retrying cannot help."""

    status_code = 503
    code = "redis_auth_failed"


class AgentTimeout(APIError):
    status_code = 504
    code = "agent_timeout"


def redis_stalled(seconds: float, then: str = "", **context: Any) -> BusUnavailable:
    """The 503 for Redis work that did not finish within `seconds`: the server stalled, overloaded or unreachable."""
    return BusUnavailable(
        f"Redis did not answer within {seconds:g} s (stalled, overloaded or unreachable); the controller "
        f"reconnects by itself, retry shortly{then}",
        **context,
    )


def credentials_problem(exc: BaseException, redis_url: str) -> str | None:
    """What to fix when `exc` is Redis refusing redis_url's credentials or their rights; None for other failures.

    redis-py raises AuthenticationError (a ConnectionError) for a wrong password, WRONGPASS and NOAUTH, so
    without this they read as "unreachable, retry shortly". The URL is shown without its password.
    """
    where = f"Redis at {redacted(redis_url)}"
    if isinstance(exc, redis.AuthenticationError):
        return (
            f"{where} refused the controller's credentials ({exc}): fix the user name and password in redis_url "
            "(redis://[user]:password@host:port/db) to match the server's requirepass or ACL user"
        )
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return (
            f"{where} denies redis_url's user a command kvbus needs ({exc}): use another user in redis_url, "
            "or give this one kvbus's keys and commands (ACL SETUSER <user> ~kvbus:* +@all)"
        )
    return None


def _body(
    status: int,
    code: str,
    detail: str | list[ValidationIssue],
    headers: Mapping[str, str] | None = None,
    **context: Any,
) -> Response:
    answer = ErrorAnswer(detail=detail, error=code, **context)
    try:
        return respond(answer, status, headers)
    except UnicodeEncodeError:  # a lone surrogate in a refused input, which JSON's \u escape still carries
        return Response(json.dumps(msgspec.to_builtins(answer)), status, headers, media_type="application/json")


def response(exc: APIError) -> Response:
    """An error's answer, for code outside the routes (middleware), where no exception handler runs."""
    return _body(exc.status_code, exc.code, exc.detail, exc.headers, **exc.context)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    if exc.status_code >= 500:
        log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status_code, exc)
    return response(exc)


async def redis_error(request: Request, exc: Exception) -> Response:
    problem = credentials_problem(exc, request.app.state.config.redis_url)
    if problem is not None:
        log.error("%s %s -> 503: %s", request.method, request.url.path, problem)
        return _body(503, RedisAuthFailed.code, problem)
    if isinstance(exc, CLUSTER_MOVING):
        log.warning("%s %s -> 503: the Redis Cluster is moving a slot (%s)", request.method, request.url.path, exc)
        return _body(
            503,
            BusUnavailable.code,
            f"the Redis Cluster is failing over or moving a slot this request needs ({type(exc).__name__}: {exc}); "
            "retry shortly",
        )
    log.warning("%s %s -> 503: Redis unreachable (%s)", request.method, request.url.path, exc)
    return _body(
        503,
        BusUnavailable.code,
        f"Redis is unreachable ({type(exc).__name__}: {exc}); the controller reconnects by itself, "
        "retry shortly and check that redis_url points at a running server",
    )


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    # Routing's headers are part of its answer: a 405's Allow lists the methods the path takes.
    return _body(exc.status_code, "http", str(exc.detail), exc.headers, path=request.url.path)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("%s %s -> 500", request.method, request.url.path, exc_info=exc)
    return _body(500, "internal", f"internal error: {type(exc).__name__}: {exc}")


Handler = Callable[[Request, Exception], Awaitable[Response]]
EXCEPTION_HANDLERS: dict[Any, Handler] = {
    APIError: api_error,
    **dict.fromkeys(REDIS_DOWN, redis_error),
    HTTPException: http_error,
    Exception: unexpected_error,
}
