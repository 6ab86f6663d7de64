"""Every error the engine answers, as data, and the one place that turns them into OpenAI-style JSON.

OpenAI clients (and vLLM's server) read `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("kvbus.engine")


class EngineError(Exception):
    status_code: ClassVar[int] = 500
    kind: ClassVar[str] = "InternalServerError"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(EngineError):
    status_code = 400
    kind = "BadRequestError"


class ModelNotFound(EngineError):
    status_code = 404
    kind = "NotFoundError"


def _body(status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status
    )


async def engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    if exc.status_code >= 500:
        log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status_code, exc.message)
    return _body(exc.status_code, exc.kind, exc.message, exc.param)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(exc.status_code, "BadRequestError")
    return _body(exc.status_code, kind, str(exc.detail))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return _body(500, EngineError.kind, f"{type(exc).__name__}: {exc}")


EXCEPTION_HANDLERS = {EngineError: engine_error, HTTPException: http_error, Exception: unexpected_error}
