"""Request bodies (schemas.py): no endpoint answers 5xx to bad input, and every refusal is JSON naming what
was wrong (FastAPI's `detail` list, as LMCache's app answers, plus kvbus's `error` and `field`), without
touching what Redis holds. test_validation.py replays FastAPI's own answers to hundreds of bodies."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from kvbus.controller.app import create_app
from kvbus.controller.errors import BodyTooDeep, InvalidField, MalformedBody, UndecodableBody, UnknownMethod
from kvbus.controller.openapi import ENDPOINTS
from kvbus.controller.schemas import (
    ClearRequest,
    MoveRequest,
    check_depth,
    check_method,
    check_move,
    check_token_count,
    check_wire_tokens,
    field_name,
    parse,
)
from kvbus.shared.config import KVBusConfig
from tests.conftest import SEED_TOKENS, RedisServer
from tests.controller.conftest import CheckedClient
from tests.controller.test_lookup import BASE, hold, lookup

POSTS = [e.path for e in ENDPOINTS if e.method == "post"]
JSON = "application/json"
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
# What LMCache's app accepts of GARBAGE (any int as a token id, any string as an instance id, unknown
# fields ignored); every other answer is a refusal, a 404 for an instance nobody registered included.
ACCEPTED = {"/lookup": 5, "/query_worker_info": 5}
BAD_REQUESTS = [
    ("/lookup", b'{"tokens": [1, 2', 422, "malformed_body", None),
    ("/lookup", b"", 422, "malformed_body", None),
    ("/lookup", b"[1, 2]", 422, "malformed_body", None),
    ("/lookup", b"\xff\xfe\xff", 400, "undecodable_body", None),
    ("/lookup", b"{}", 422, "invalid_field", "tokens"),
    ("/lookup", b'{"tokens": "128000"}', 422, "invalid_field", "tokens"),
    ("/lookup", b'{"tokens": [1, 2.5]}', 422, "invalid_field", "tokens[1]"),
    ("/lookup", b'{"tokens": [1, null]}', 422, "invalid_field", "tokens[1]"),
    ("/lookup", b'{"tokens": [' + b",".join([b"1"] * 4097) + b"]}", 422, "invalid_field", "tokens"),
    ("/clear", b'{"location": "LocalCPUBackend"}', 422, "invalid_field", "instance_id"),
    ("/clear", b'{"instance_id": "i"}', 422, "invalid_field", "location"),
    ("/clear", b'{"instance_id": 7, "location": "LocalCPUBackend"}', 422, "invalid_field", "instance_id"),
    ("/clear", b'{"instance_id": "i", "location": null}', 422, "invalid_field", "location"),
    ("/clear", b'{"instance_id": "", "location": "LocalCPUBackend"}', 404, "unknown_instance", None),
    ("/clear", b'{"instance_id": "i", "location": "GPU0"}', 404, "unknown_instance", None),
    ("/clear", b"not json", 422, "malformed_body", None),
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
    assert refused == len(GARBAGE) - ACCEPTED.get(path, 0)


def _deep(depth: int, opener: bytes = b"[", closer: bytes = b"]", inner: bytes = b"") -> bytes:
    return opener * depth + inner + closer * depth


# Each of these made every POST a 500 (RecursionError, from msgspec's or json's parser).
DEEP = [
    _deep(1000),
    _deep(100_000),
    b'{"tokens": ' + _deep(5000) + b"}",
    b'{"instance_id": "i", "location": "l", "unknown": ' + _deep(5000) + b"}",  # an ignored field, too
    _deep(2000, b'{"a": ', b"}", b"1"),
    b'{"tokens": [1, ' + _deep(65) + b"]}",  # one level over the limit
]


@pytest.mark.parametrize("path", POSTS)
def test_deeply_nested_json_is_a_400_saying_so_before_any_parser_recurses(module_client: TestClient, path: str) -> None:
    for body in DEEP:
        response = module_client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, body[:40], response.text[:200])
        assert response.json()["error"] == "body_too_deep"
        assert "at most 64" in response.json()["detail"], response.text
    # 64 levels, or brackets inside strings, are no refusal: the body is read as usual.
    at_limit = b'{"tokens": [1], "extra": ' + _deep(63) + b"}"
    in_strings = b'{"tokens": [1], "extra": "' + b"[" * 1000 + b'\\"' + b"{" * 1000 + b'"}'
    for body in (at_limit, in_strings):
        response = module_client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.json().get("error") != "body_too_deep", (path, response.text[:200])
        assert response.status_code < 500


def test_the_depth_scan_counts_only_brackets_outside_strings() -> None:
    check_depth(_deep(64))
    check_depth(b'["' + b"[" * 100 + b'"]')
    check_depth(b'["\\\\\\"' + b"[" * 100 + b'"]')  # an escaped backslash, then an escaped quote: still a string
    with pytest.raises(BodyTooDeep, match="nested 65 levels"):
        check_depth(_deep(65))
    with pytest.raises(BodyTooDeep, match="nested 100 levels"):
        check_depth(b'["\\\\"' + b"," + _deep(99) + b"]")  # the string ends at its quote: the brackets count


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
    answer = response.json()
    assert answer["error"] == error
    if status == 422:  # FastAPI's list, as LMCache's app answers
        assert all({"type", "loc", "msg", "input"} <= issue.keys() for issue in answer["detail"])
        assert answer["detail"][0]["loc"][0] == "body"
    else:
        assert isinstance(answer["detail"], str) and answer["detail"]
    if field is not None:
        assert answer["field"] == field == field_name(answer["detail"][0]["loc"])
    assert lookup(client, SEED_TOKENS) == {"keeper": ["LocalCPUBackend", 12]}


def test_a_refusal_lists_every_problem_as_fastapi_does(client: TestClient) -> None:
    response = client.post("/clear", json={"instance_id": ["i"]})
    assert response.status_code == 422
    assert response.json() == {
        "detail": [
            {
                "type": "string_type",
                "loc": ["body", "instance_id"],
                "msg": "Input should be a valid string",
                "input": ["i"],
            },
            {"type": "missing", "loc": ["body", "location"], "msg": "Field required", "input": {"instance_id": ["i"]}},
        ],
        "error": "invalid_field",
        "field": "instance_id",
    }


def test_parse_decodes_a_valid_body_and_ignores_unknown_fields_as_lmcache_does() -> None:
    body = b'{"instance_id": "i", "location": "LocalDiskBackend", "extra": 1}'
    assert parse(body, JSON, ClearRequest) == ClearRequest(instance_id="i", location="LocalDiskBackend")
    move = parse(
        b'{"old_position": ["a", "LocalCPUBackend"], "new_position": ["b", "LocalCPUBackend"]}', JSON, MoveRequest
    )
    assert (move.tokens, move.should_copy) == ([], False)  # every chunk, moved rather than copied
    lax = parse(b'{"old_position": ["a", "X"], "new_position": ["b", "Y"], "should_copy": "yes"}', JSON, MoveRequest)
    assert lax.should_copy is True  # pydantic's lax mode, as LMCache's model reads it


def test_parse_names_the_field_or_says_the_body_is_malformed() -> None:
    with pytest.raises(InvalidField) as nested:
        parse(b'{"old_position": ["a", 5], "new_position": ["b", "LocalCPUBackend"]}', JSON, MoveRequest)
    assert nested.value.context == {"field": "old_position[1]"}
    for body in (b"[]", b"{", b""):
        with pytest.raises(MalformedBody):
            parse(body, JSON, ClearRequest)
    with pytest.raises(UndecodableBody, match="There was an error parsing the body"):
        parse(b"\xff\xfe\xff", JSON, ClearRequest)


def test_token_count_move_and_method_checks() -> None:
    check_token_count([1] * 4, 4)
    with pytest.raises(InvalidField, match="at most 4 items after validation, not 5 \\(max_lookup_tokens\\)") as over:
        check_token_count([1] * 5, 4)
    assert over.value.context == {"field": "tokens"}
    assert over.value.detail[0].ctx == {"field_type": "List", "max_length": 4, "actual_length": 5}
    check_move(MoveRequest(old_position=("a", "X"), new_position=("a", "Y")))
    with pytest.raises(InvalidField, match="old_position and new_position are the same") as same:
        check_move(MoveRequest(old_position=("a", "X"), new_position=("a", "X")))
    assert same.value.detail[0].type == "value_error"
    check_method("zlib")
    check_method("cachegen")  # LMCache's own: passed to the workers, which decide


def test_a_command_s_token_ids_must_fit_the_wire_to_lmcache_workers_a_lookup_s_need_not(client: TestClient) -> None:
    check_wire_tokens([2**64 - 1, -(2**63), -1, 2**32])
    with pytest.raises(InvalidField) as past:
        check_wire_tokens([1, 2**64, -(2**63) - 1])
    assert past.value.context == {"field": "tokens[1]"}
    assert [(i.type, i.loc, i.ctx) for i in past.value.detail] == [
        ("less_than_equal", ["body", "tokens", 1], {"le": 2**64 - 1}),
        ("greater_than_equal", ["body", "tokens", 2], {"ge": -(2**63)}),
    ]
    pin = client.post("/pin", json={"instance_id": "i", "location": "LocalCPUBackend", "tokens": [2**70]})
    assert pin.status_code == 422 and pin.json()["detail"][0]["type"] == "less_than_equal"
    assert client.post("/lookup", json={"tokens": [2**70, -(2**70)]}).json()["layout_info"] == {}
    with pytest.raises(UnknownMethod, match="unknown compression method 'magic'; known methods: .*int8") as unknown:
        check_method("magic")
    assert unknown.value.context == {"field": "method"}
