"""Request bodies read as LMCache's app reads them (validation.py, schemas.parse): FastAPI's own answers to
hundreds of bodies, recorded with LMCache 0.5.6's request models (record_fastapi_validation.py), replayed.

An accepted body must give the same values pydantic converted it to; a refused one the same status and
the same `detail` list, entry for entry (type, loc, msg, input, ctx). Deliberate differences: where
the bad input is a NaN, an infinity or a lone surrogate, FastAPI cannot encode its own 422 and answers a
plain-text 500; kvbus answers the 422 (a NaN or an infinity as null, a surrogate as JSON's \\u escape).
A body nested over 64 levels is FastAPI's 400 too, but kvbus's detail says why. A body not sent as JSON
(FastAPI reads it as text, or an empty one as missing, and answers 422) is a 415, unread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
from starlette.datastructures import QueryParams

from kvbus.controller import schemas
from kvbus.controller.errors import (
    APIError,
    BodyTooDeep,
    InvalidField,
    MalformedBody,
    UndecodableBody,
    UnsupportedMediaType,
)
from kvbus.controller.validation import Invalid, is_json, validate_query_int

RECORDED = json.loads(Path(__file__).with_name("fastapi_validation.json").read_text())
KINDS: dict[str, type[msgspec.Struct]] = {
    "/lookup": schemas.LookupRequest,
    "/clear": schemas.ClearRequest,
    "/pin": schemas.PinRequest,
    "/compress": schemas.CompressRequest,
    "/decompress": schemas.CompressRequest,
    "/move": schemas.MoveRequest,
    "/health": schemas.InstanceRequest,
    "/check_finish": schemas.CheckFinishRequest,
    "/query_worker_info": schemas.QueryWorkerInfoRequest,
    "/query_instance": schemas.QueryInstanceRequest,
}
POSTS = [r for r in RECORDED if r["method"] == "POST"]
GETS = [r for r in RECORDED if r["method"] == "GET"]


def _id(record: dict[str, Any]) -> str:
    shown = record.get("body", record.get("body_hex", record.get("query", "")))
    return f"{record['path']} {record.get('content_type', '')} {shown[:60]!r}"


def _body(record: dict[str, Any]) -> bytes:
    return bytes.fromhex(record["body_hex"]) if "body_hex" in record else record["body"].encode()


def _answer(exc: APIError) -> Any:
    """The `detail` kvbus answers, as a client decodes it (a lone surrogate goes as JSON's \\u escape)."""
    return json.loads(json.dumps(msgspec.to_builtins(exc.detail)))


def _unencodable(value: Any) -> bool:
    """What Starlette's JSONResponse cannot encode: a NaN or an infinity, a lone surrogate."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_unencodable(v) for v in value.values())
    if isinstance(value, list):
        return any(_unencodable(v) for v in value)
    return isinstance(value, str) and any(0xD800 <= ord(c) < 0xE000 for c in value)


def test_the_recording_covers_every_endpoint_and_outcome() -> None:
    assert {r["path"] for r in POSTS} == set(KINDS)
    assert {r["status"] for r in POSTS} == {200, 400, 422, 500}
    assert len(POSTS) > 700


@pytest.mark.parametrize("record", POSTS, ids=_id)
def test_a_body_is_read_as_fastapi_reads_it_for_lmcache(record: dict[str, Any]) -> None:
    kind = KINDS[record["path"]]
    status, expected = record["status"], record["response"]
    if not is_json(record["content_type"]):
        with pytest.raises(UnsupportedMediaType):
            schemas.parse(_body(record), record["content_type"], kind)
        assert status == 422  # FastAPI's
        return
    try:
        parsed = schemas.parse(_body(record), record["content_type"], kind)
    except APIError as exc:
        assert (exc.status_code, status) in ((422, 422), (400, 400), (422, 500)), (exc.status_code, exc.detail)
        if status == 500:  # FastAPI could not encode its own answer
            assert expected == "Internal Server Error"
            assert any(_unencodable(issue.input) for issue in exc.detail), exc.detail
            return
        if isinstance(exc, BodyTooDeep):
            assert status == 400 and expected["detail"] == "There was an error parsing the body"
            return
        assert _answer(exc) == expected["detail"]
        if status == 422:
            assert isinstance(exc, MalformedBody | InvalidField)
        else:
            assert isinstance(exc, UndecodableBody)
        return
    assert status == 200, f"kvbus accepted what FastAPI answered {status}: {expected}"
    assert json.loads(msgspec.json.encode(parsed)) == expected


@pytest.mark.parametrize("record", GETS, ids=_id)
def test_a_query_integer_is_read_as_fastapi_reads_it(record: dict[str, Any]) -> None:
    value = QueryParams(record["query"]).get("worker_id")
    try:
        parsed = None if value is None else validate_query_int(value, "worker_id")
    except Invalid as exc:
        assert record["status"] == 422
        assert json.loads(msgspec.json.encode(exc.issues)) == record["response"]["detail"]
        return
    assert record["status"] == 503  # accepted: LMCache's handler then wants its controller manager
    assert parsed is None or isinstance(parsed, int)


def test_the_first_problem_names_the_field_and_whole_body_problems_are_malformed_body() -> None:
    with pytest.raises(InvalidField) as bad_item:
        schemas.parse(b'{"tokens": [1, "x", null]}', "application/json", schemas.LookupRequest)
    assert bad_item.value.context == {"field": "tokens[1]"}
    assert [issue.loc for issue in bad_item.value.detail] == [["body", "tokens", 1], ["body", "tokens", 2]]
    with pytest.raises(InvalidField) as nested:
        schemas.parse(
            b'{"old_position": ["a", 1], "new_position": ["b", "c"]}', "application/json", schemas.MoveRequest
        )
    assert nested.value.context == {"field": "old_position[1]"}
    for body in (b"", b"{"):
        with pytest.raises(MalformedBody):
            schemas.parse(body, "application/json", schemas.LookupRequest)


def test_floats_that_are_not_finite_are_refused_with_the_input_as_null() -> None:
    with pytest.raises(InvalidField) as infinite:
        schemas.parse(b'{"tokens": [Infinity, 1, NaN]}', "application/json", schemas.LookupRequest)
    assert [(i.type, i.loc) for i in infinite.value.detail] == [
        ("finite_number", ["body", "tokens", 0]),
        ("finite_number", ["body", "tokens", 2]),
    ]
    assert all(_unencodable(i.input) for i in infinite.value.detail)
    assert json.loads(msgspec.json.encode(infinite.value.detail))[0]["input"] is None
