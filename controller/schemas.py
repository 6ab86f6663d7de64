"""Request bodies of the LMCache controller API, decoded and validated in one step, as LMCache's own do.

Each Struct declares the fields and types of LMCache 0.5.6's pydantic request model (same names,
same order, same defaults), so kvbus accepts what LMCache accepts: whatever pydantic's lax mode
converts, unknown fields ignored, any string as an instance id or a location (a location no worker
has clears nothing), any integer as a token id. A refusal is FastAPI's 422 with its `detail` list
(validation.py), plus kvbus's `error` code and the first problem's `field`. On top of LMCache's
models kvbus bounds a token list by `max_lookup_tokens`, a command's token ids by what msgpack
carries, and refuses a move onto itself, in the same 422 shape; it refuses a compression method it
does not know with a 400.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

from kvbus.controller import validation
from kvbus.controller.answers import ValidationIssue
from kvbus.controller.errors import (
    BodyTooDeep,
    InvalidField,
    MalformedBody,
    UndecodableBody,
    UnknownMethod,
    UnsupportedMediaType,
)
from kvbus.shared import compression, json_depth

# What a command's token ids may be: they travel to LMCache workers as msgpack ints (LMCache's own
# controller fails to encode others and answers 500). A lookup takes any integer: it never leaves.
WIRE_INT_MIN, WIRE_INT_MAX = -(2**63), 2**64 - 1
# The bound is check_wire_tokens', in FastAPI's 422 shape; the annotation documents it in the schema.
CommandToken = Annotated[int, msgspec.Meta(extra_json_schema={"minimum": WIRE_INT_MIN, "maximum": WIRE_INT_MAX})]


class LookupRequest(msgspec.Struct):
    tokens: list[int]  # empty: a miss, as in LMCache


class ClearRequest(msgspec.Struct):
    instance_id: str
    location: str


class PinRequest(msgspec.Struct):
    instance_id: str
    location: str
    tokens: list[CommandToken]


# Any string passes decoding, so that an unknown method is check_method's 400 naming the known ones
# rather than a 422; the schema still lists them, for clients and generated tests.
CompressionMethod = Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(compression.METHODS)})]


class CompressRequest(msgspec.Struct):
    instance_id: str
    method: CompressionMethod
    location: str
    tokens: list[CommandToken] | None = msgspec.field(default_factory=list)  # empty or null: every chunk there


class MoveRequest(msgspec.Struct):
    old_position: tuple[str, str]  # (instance_id, location)
    new_position: tuple[str, str]
    tokens: list[CommandToken] | None = msgspec.field(default_factory=list)  # empty or null: all at the old position
    should_copy: bool | None = False


class InstanceRequest(msgspec.Struct):
    instance_id: str


class CheckFinishRequest(msgspec.Struct):
    event_id: str


class QueryWorkerInfoRequest(msgspec.Struct):
    instance_id: str  # "all" for every instance
    worker_ids: list[int] | None = None  # null or empty: every worker


class QueryInstanceRequest(msgspec.Struct):
    event_id: str  # LMCache requires it and answers with an event id of its own
    ip: str


Body = TypeVar(
    "Body",
    LookupRequest,
    ClearRequest,
    PinRequest,
    CompressRequest,
    MoveRequest,
    InstanceRequest,
    CheckFinishRequest,
    QueryWorkerInfoRequest,
    QueryInstanceRequest,
)


# The deepest request body is 2 levels ({"old_position": [id, location]}); 64 leaves room for the unknown
# fields clients send and kvbus ignores, far below the ~1000 levels at which msgspec's and json's parsers
# recurse out of Python's stack (a RecursionError, so a 500).
MAX_DEPTH = 64


def parse(body: bytes, content_type: str | None, kind: type[Body]) -> Body:
    """The request, or the error FastAPI would answer for it in LMCache's app.

    Unlike FastAPI, a body not sent as JSON is a 415, not a 422 (guard.py says why).
    """
    if not validation.is_json(content_type):
        shown = f"Content-Type: {content_type}" if content_type else "no Content-Type"
        raise UnsupportedMediaType(
            f"request bodies must be JSON sent as Content-Type: application/json ({shown}); a web page can send "
            "other types to any site without asking, so kvbus reads none"
        )
    check_depth(body)
    try:
        return msgspec.json.decode(body, type=kind)  # the usual well-formed body, at msgspec's speed
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass  # read again as FastAPI reads it, for its conversions or its errors
    try:
        fields = validation.validate_body(validation.read_body(body), kind)
    except validation.Unreadable:
        raise UndecodableBody("There was an error parsing the body") from None
    except validation.Invalid as exc:
        raise refusal(exc.issues) from None
    return msgspec.convert(fields, kind)


def check_depth(body: bytes) -> None:
    """Refuse a body nested deeper than MAX_DEPTH, before any parser recurses into it.

    FastAPI answers such a body "There was an error parsing the body"; this says what is wrong with it.
    """
    depth = json_depth.deeper_than(body, MAX_DEPTH)
    if depth is not None:
        raise BodyTooDeep(f"request body is nested {depth} levels deep; at most {MAX_DEPTH} are accepted")


def refusal(issues: list[ValidationIssue]) -> MalformedBody | InvalidField:
    """The 422 for pydantic's `issues`: malformed_body when the body as a whole is wrong, else invalid_field."""
    first = issues[0]
    if first.type == "json_invalid" or len(first.loc) == 1:
        return MalformedBody(issues)
    return InvalidField(issues, field=field_name(first.loc))


def field_name(loc: list[str | int]) -> str:
    """`["body", "tokens", 3]` as `tokens[3]`."""
    name = ""
    for part in loc[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else part
    return name


def check_token_count(tokens: list[int] | None, limit: int) -> None:
    if tokens is not None and len(tokens) > limit:
        msg = f"List should have at most {limit} items after validation, not {len(tokens)} (max_lookup_tokens)"
        detail = validation.issue(
            "too_long", ("body", "tokens"), msg, tokens, field_type="List", max_length=limit, actual_length=len(tokens)
        )
        raise InvalidField([detail], field="tokens")


def check_wire_tokens(tokens: list[int] | None) -> None:
    issues = []
    for n, token in enumerate(tokens or ()):
        if token < WIRE_INT_MIN:
            msg = f"Input should be greater than or equal to {WIRE_INT_MIN}"
            issues.append(validation.issue("greater_than_equal", ("body", "tokens", n), msg, token, ge=WIRE_INT_MIN))
        elif token > WIRE_INT_MAX:
            msg = f"Input should be less than or equal to {WIRE_INT_MAX}"
            issues.append(validation.issue("less_than_equal", ("body", "tokens", n), msg, token, le=WIRE_INT_MAX))
    if issues:
        raise InvalidField(issues, field=field_name(issues[0].loc))


def check_move(body: MoveRequest) -> None:
    if body.old_position == body.new_position:
        error = "old_position and new_position are the same"
        detail = validation.issue(
            "value_error", ("body", "new_position"), f"Value error, {error}", list(body.new_position), error=error
        )
        raise InvalidField([detail], field="new_position")


def check_method(method: str) -> None:
    if method not in compression.METHODS:
        raise UnknownMethod(
            f"unknown compression method {method!r}; known methods: {', '.join(compression.METHODS)}", field="method"
        )
