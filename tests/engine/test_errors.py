"""Every engine error becomes OpenAI's `{"error": {...}}` body with the status its class names."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from kvbus.engine.errors import EXCEPTION_HANDLERS, BadRequest, EngineError, ModelNotFound

FAILURES: dict[str, Exception] = {
    "bad": BadRequest("top_p must be in (0, 1]", param="top_p"),
    "missing": ModelNotFound("no such model", param="model"),
    "broken": EngineError("the model thread is gone"),
    "teapot": HTTPException(418, "short and stout"),
    "crash": RuntimeError("boom"),
}


async def fail(request: Request) -> Response:
    raise FAILURES[request.path_params["name"]]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = Starlette(routes=[Route("/fail/{name}", fail)], exception_handlers=EXCEPTION_HANDLERS)
    # The catch-all handler answers, then Starlette re-raises for the server to log: the test wants the answer.
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (EngineError, 500, "InternalServerError"),
        (BadRequest, 400, "BadRequestError"),
        (ModelNotFound, 404, "NotFoundError"),
    ],
)
def test_each_error_class_names_its_status_and_openai_type(error: type[EngineError], status: int, kind: str) -> None:
    raised = error("why", param="field")
    assert (raised.status_code, raised.kind, raised.message, raised.param, str(raised)) == (
        status,
        kind,
        "why",
        "field",
        "why",
    )
    assert error("why").param is None


@pytest.mark.parametrize(
    ("name", "status", "kind", "message", "param"),
    [
        ("bad", 400, "BadRequestError", "top_p must be in (0, 1]", "top_p"),
        ("missing", 404, "NotFoundError", "no such model", "model"),
        ("broken", 500, "InternalServerError", "the model thread is gone", None),
        ("teapot", 418, "BadRequestError", "short and stout", None),
        ("crash", 500, "InternalServerError", "RuntimeError: boom", None),
    ],
)
def test_errors_become_the_openai_error_body(
    client: TestClient, name: str, status: int, kind: str, message: str, param: str | None
) -> None:
    response = client.get(f"/fail/{name}")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {"message": message, "type": kind, "param": param, "code": status}}


def test_routing_errors_get_the_same_shape(client: TestClient) -> None:
    missing = client.get("/nowhere")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"message": "Not Found", "type": "NotFoundError", "param": None, "code": 404}}
    wrong_method = client.post("/fail/bad")
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {
        "error": {"message": "Method Not Allowed", "type": "MethodNotAllowed", "param": None, "code": 405}
    }


def test_server_faults_are_logged_and_client_mistakes_are_not(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="kvbus.engine"):
        client.get("/fail/bad")
        client.get("/fail/missing")
        client.get("/fail/broken")
        client.get("/fail/crash")
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "kvbus.engine"]
    # Only the two 500s are logged: a 4xx is the client's mistake, and the client already has the reason.
    assert logged == [
        (logging.WARNING, "GET /fail/broken -> 500 the model thread is gone"),
        (logging.ERROR, "GET /fail/crash failed"),
    ]
    assert caplog.records[-1].exc_info is not None and "boom" in str(caplog.records[-1].exc_info[1])
