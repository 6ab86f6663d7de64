"""Request bodies of the LMCache controller API, decoded and validated in one step.

Malformed JSON is a 400; a missing or ill-typed field is a 422 that names the field.
Unknown fields are ignored, as LMCache's pydantic models ignore them.
"""

from __future__ import annotations

import re
from typing import Annotated, TypeVar

import msgspec

from kvbus.controller.errors import InvalidField, MalformedBody, UnknownMethod
from kvbus.shared import compression
from kvbus.shared.hashing import TOKEN_LIMIT
from kvbus.shared.locations import KNOWN, Location

TokenId = Annotated[int, msgspec.Meta(ge=0, lt=TOKEN_LIMIT)]
InstanceId = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class LookupRequest(msgspec.Struct):
    tokens: Annotated[list[TokenId], msgspec.Meta(min_length=1)]


class ClearRequest(msgspec.Struct):
    instance_id: InstanceId
    location: Location


class PinRequest(msgspec.Struct):
    instance_id: InstanceId
    location: Location
    tokens: Annotated[list[TokenId], msgspec.Meta(min_length=1)]


class CompressRequest(msgspec.Struct):
    instance_id: InstanceId
    method: Annotated[str, msgspec.Meta(min_length=1)]
    location: Location
    tokens: list[TokenId] = msgspec.field(default_factory=list)  # empty: every chunk at `location`


class MoveRequest(msgspec.Struct):
    old_position: tuple[InstanceId, Location]
    new_position: tuple[InstanceId, Location]
    tokens: list[TokenId] = msgspec.field(default_factory=list)  # empty: every chunk at the old position
    should_copy: bool = False


class InstanceRequest(msgspec.Struct):
    instance_id: InstanceId


class CheckFinishRequest(msgspec.Struct):
    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class QueryWorkerInfoRequest(msgspec.Struct):
    instance_id: InstanceId  # "all" for every instance
    worker_ids: list[Annotated[int, msgspec.Meta(ge=0)]] | None = None


class QueryInstanceRequest(msgspec.Struct):
    ip: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    event_id: str = ""  # LMCache requires it and ignores it


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

_FIELD_AT = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def parse(body: bytes, kind: type[Body]) -> Body:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        found = _FIELD_AT.search(message) or _MISSING.search(message)
        field = found.group(1) if found else ""
        if field == "location":
            message += f"; known locations: {KNOWN}"
        if field == "":
            message += "; the body must be a JSON object"
        raise InvalidField(message, field=field) from None
    except msgspec.DecodeError as exc:
        raise MalformedBody(f"request body is not valid JSON: {exc}") from None


def check_token_count(tokens: list[int], limit: int) -> None:
    if len(tokens) > limit:
        raise InvalidField(
            f"tokens: {len(tokens)} tokens exceed the limit of {limit} (max_lookup_tokens)", field="tokens"
        )


def check_method(method: str) -> None:
    if method not in compression.METHODS:
        raise UnknownMethod(
            f"unknown compression method {method!r}; known methods: {', '.join(compression.METHODS)}", field="method"
        )
