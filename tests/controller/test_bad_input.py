"""No endpoint answers 5xx to bad input, and every refusal is JSON naming what was wrong."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from kvbus.controller.app import create_app
from kvbus.controller.openapi import ENDPOINTS
from kvbus.shared.config import KVBusConfig
from tests.controller.conftest import CheckedClient

POSTS = [e.path for e in ENDPOINTS if e.method == "post"]
GARBAGE = [
    b"",
    b"null",
    b"[]",
    b"{}",
    b"7",
    b'"text"',
    b"\xff\xfe",
    b"{",
    b'{"instance_id": 5}',
    b'{"instance_id": "", "location": "LocalCPUBackend", "tokens": [1]}',
    b'{"instance_id": "x", "location": "LocalCPUBackend", "tokens": [-1]}',
    b'{"instance_id": "x", "location": "LocalCPUBackend", "tokens": [99999999999999999999]}',
    b'{"instance_id": "x", "location": "LocalCPUBackend", "tokens": [1.5]}',
    b'{"instance_id": "x", "location": ["LocalCPUBackend"], "tokens": {}}',
    b'{"tokens": [], "event_id": null, "ip": 3, "worker_ids": "all", "method": 1}',
    b'{"old_position": "x", "new_position": [1, 2, 3], "tokens": [1], "should_copy": "yes"}',
]


@pytest.fixture(scope="module")
def client(redis_server: object) -> Iterator[TestClient]:
    url = redis_server.url  # type: ignore[attr-defined]
    with CheckedClient(create_app(KVBusConfig(redis_url=url, command_timeout=0.5))) as test_client:
        yield test_client


@pytest.mark.parametrize("path", POSTS)
def test_garbage_never_gets_a_5xx(client: TestClient, path: str) -> None:
    refused = 0
    for body in GARBAGE:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code < 500, (path, body, response.status_code, response.text)
        if response.status_code >= 400:
            answer = response.json()
            assert answer["error"] and answer["detail"], (path, body, answer)
            refused += 1
    # Only /lookup accepts any of these: two carry a valid token list, and it ignores unknown fields.
    assert refused == len(GARBAGE) - (2 if path == "/lookup" else 0)


def test_unknown_paths_and_methods_are_json_too(client: TestClient) -> None:
    assert client.get("/nowhere").json()["error"] == "http"
    assert client.get("/clear").status_code == 405
