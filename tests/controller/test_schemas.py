"""Request bodies (schemas.py): no endpoint answers 5xx to bad input, and every refusal is JSON naming what
was wrong, without touching what Redis holds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from kvbus.controller.app import create_app
from kvbus.controller.errors import InvalidField, MalformedBody, UnknownMethod
from kvbus.controller.openapi import ENDPOINTS
from kvbus.controller.schemas import ClearRequest, MoveRequest, check_method, check_token_count, parse
from kvbus.shared.config import KVBusConfig
from kvbus.shared.locations import Location
from tests.conftest import SEED_TOKENS, RedisServer
from tests.controller.conftest import CheckedClient
from tests.controller.test_lookup import BASE, hold, lookup

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
BAD_REQUESTS = [
    ("/lookup", b'{"tokens": [1, 2', 400, "malformed_body", None),
    ("/lookup", b"", 400, "malformed_body", None),
    ("/lookup", b"[1, 2]", 422, "invalid_field", ""),
    ("/lookup", b"{}", 422, "invalid_field", "tokens"),
    ("/lookup", b'{"tokens": "128000"}', 422, "invalid_field", "tokens"),
    ("/lookup", b'{"tokens": []}', 422, "invalid_field", "tokens"),
    ("/lookup", b'{"tokens": [1, -1]}', 422, "invalid_field", "tokens[1]"),
    ("/lookup", b'{"tokens": [1, 4294967296]}', 422, "invalid_field", "tokens[1]"),
    ("/lookup", b'{"tokens": [1, 2.5]}', 422, "invalid_field", "tokens[1]"),
    ("/lookup", b'{"tokens": [1, null]}', 422, "invalid_field", "tokens[1]"),
    ("/lookup", b'{"tokens": [' + b",".join([b"1"] * 4097) + b"]}", 422, "invalid_field", "tokens"),
    ("/clear", b'{"location": "LocalCPUBackend"}', 422, "invalid_field", "instance_id"),
    ("/clear", b'{"instance_id": "i"}', 422, "invalid_field", "location"),
    ("/clear", b'{"instance_id": "", "location": "LocalCPUBackend"}', 422, "invalid_field", "instance_id"),
    ("/clear", b'{"instance_id": 7, "location": "LocalCPUBackend"}', 422, "invalid_field", "instance_id"),
    ("/clear", b'{"instance_id": "i", "location": "GPU0"}', 422, "invalid_field", "location"),
    ("/clear", b"not json", 400, "malformed_body", None),
]


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


@pytest.fixture(scope="module")
def module_client(redis_server: RedisServer) -> Iterator[TestClient]:
    """One app for the many garbage posts, which need no agent and leave Redis as it was."""
    with CheckedClient(create_app(KVBusConfig(redis_url=redis_server.url, command_timeout=0.5))) as test_client:
        yield test_client


@pytest.mark.parametrize("path", POSTS)
def test_garbage_never_gets_a_5xx(module_client: TestClient, path: str) -> None:
    refused = 0
    for body in GARBAGE:
        response = module_client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code < 500, (path, body, response.status_code, response.text)
        if response.status_code >= 400:
            answer = response.json()
            assert answer["error"] and answer["detail"], (path, body, answer)
            refused += 1
    # Only /lookup accepts any of these: two carry a valid token list, and it ignores unknown fields.
    assert refused == len(GARBAGE) - (2 if path == "/lookup" else 0)


@pytest.mark.parametrize(("path", "body", "status", "error", "field"), BAD_REQUESTS)
def test_bad_input_gets_a_json_error_naming_the_field_and_loses_nothing(
    client: TestClient,
    redis_url: str,
    path: str,
    body: bytes,
    status: int,
    error: str,
    field: str | None,
) -> None:
    hold(redis_url, "keeper", SEED_TOKENS)
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.json()["detail"]
    if field is not None:
        assert response.json()["field"] == field
        assert field.split("[")[0] in response.json()["detail"] or field == ""
    assert lookup(client, SEED_TOKENS) == {"keeper": ["LocalCPUBackend", 12]}


def test_an_unknown_location_lists_the_known_ones(client: TestClient) -> None:
    response = client.post("/clear", json={"instance_id": "i", "location": "GPU0"})
    assert "LocalCPUBackend, LocalGPUBackend, LocalDiskBackend" in response.json()["detail"]


def test_parse_decodes_a_valid_body_and_ignores_unknown_fields_as_lmcache_does() -> None:
    assert parse(b'{"instance_id": "i", "location": "LocalDiskBackend", "extra": 1}', ClearRequest) == ClearRequest(
        instance_id="i", location=Location.DISK
    )
    move = parse(b'{"old_position": ["a", "LocalCPUBackend"], "new_position": ["b", "LocalCPUBackend"]}', MoveRequest)
    assert (move.tokens, move.should_copy) == ([], False)  # every chunk, moved rather than copied


def test_parse_names_the_field_or_says_the_body_must_be_an_object() -> None:
    with pytest.raises(InvalidField) as nested:
        parse(b'{"old_position": ["a", "Nowhere"], "new_position": ["b", "LocalCPUBackend"]}', MoveRequest)
    assert nested.value.context == {"field": "old_position[1]"}
    with pytest.raises(InvalidField, match="the body must be a JSON object") as whole:
        parse(b"[]", ClearRequest)
    assert whole.value.context == {"field": ""}
    with pytest.raises(MalformedBody, match="not valid JSON"):
        parse(b"{", ClearRequest)


def test_token_count_and_method_checks() -> None:
    check_token_count([1] * 4, 4)
    with pytest.raises(InvalidField, match="5 tokens exceed the limit of 4 \\(max_lookup_tokens\\)") as over:
        check_token_count([1] * 5, 4)
    assert over.value.context == {"field": "tokens"}
    check_method("zlib")
    with pytest.raises(UnknownMethod, match="unknown compression method 'magic'; known methods: .*int8") as unknown:
        check_method("magic")
    assert unknown.value.context == {"field": "method"}
