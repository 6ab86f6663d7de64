"""Commands, results and events as they travel on Redis streams.

Each message is a flat set of readable stream fields (`redis-cli XRANGE` shows them as
they are): strings go as they are, everything else as JSON. `decode` raises DecodeError,
chained from the cause, for anything that does not fit the schema.
"""

from __future__ import annotations

import functools
import json
from enum import StrEnum
from typing import Any, TypeVar

import msgspec


class DecodeError(ValueError):
    """A stream entry that is not a valid kvbus message."""


class CommandKind(StrEnum):
    CLEAR = "clear"
    PIN = "pin"
    UNPIN = "unpin"
    COMPRESS = "compress"
    DECOMPRESS = "decompress"
    HEALTH = "health"
    MOVE = "move"


class ResultStatus(StrEnum):
    OK = "ok"
    EXPIRED = "expired"  # arrived after its deadline; nothing was done
    ERROR = "error"  # the agent tried and failed; `detail` says why
    REFUSED = "refused"  # the request cannot be done there (say, compress on disk); nothing was done


class EventKind(StrEnum):
    REGISTERED = "registered"
    DEREGISTERED = "deregistered"
    RESYNCED = "resynced"
    REAPED = "reaped"  # removed by a controller after `reap_after` seconds without a heartbeat


class Command(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    kind: CommandKind
    reply_to: str  # the result stream of the controller process that waits
    timeout_ms: int  # counted from the stream entry's id, which is Redis server time
    location: str = ""
    tokens: list[int] = msgspec.field(default_factory=list)  # empty: every chunk at `location`
    method: str = ""  # compression method, for compress and decompress
    # move: where the chunks go. peers: the destination worker's peer endpoint for each source
    # worker (host:port), absent when they stay within the instance.
    dest_location: str = ""
    peers: dict[str, str] = msgspec.field(default_factory=dict)  # worker id (as text) -> host:port
    should_copy: bool = False


class Result(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    instance_id: str
    worker_id: int
    status: ResultStatus
    num_tokens: int = 0
    error_code: int = 0  # health: LMCache's codes, 0 healthy
    detail: str = ""


class AgentEvent(msgspec.Struct, frozen=True, kw_only=True):
    kind: EventKind
    instance_id: str
    worker_id: int
    detail: str = ""


Message = TypeVar("Message", Command, Result, AgentEvent)


def encode(message: Command | Result | AgentEvent) -> dict[str, str]:
    """Stream fields; fields left at their defaults are omitted, so entries stay short and readable."""
    fields: dict[str, str] = {}
    for name, default in _defaults(type(message)):
        value = getattr(message, name)
        if default is not _REQUIRED and value == default:
            continue
        fields[name] = str(value) if isinstance(value, str) else json.dumps(value)
    return fields


_REQUIRED = object()


@functools.cache
def _defaults(kind: type[msgspec.Struct]) -> tuple[tuple[str, Any], ...]:
    def default(spec: msgspec.structs.FieldInfo) -> Any:
        if spec.default is not msgspec.NODEFAULT:
            return spec.default
        return spec.default_factory() if spec.default_factory is not msgspec.NODEFAULT else _REQUIRED

    return tuple((spec.name, default(spec)) for spec in msgspec.structs.fields(kind))


def decode(kind: type[Message], fields: dict[Any, Any]) -> Message:
    """Build a `kind` from stream fields (bytes or str), validating every value."""
    try:
        raw = {_text(k): _text(v) for k, v in fields.items()}
        values: dict[str, Any] = {}
        for name, is_text in _field_kinds(kind):
            if name in raw:
                values[name] = raw[name] if is_text else json.loads(raw[name])
        return msgspec.convert(values, type=kind)
    except (msgspec.ValidationError, ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"not a valid {kind.__name__}: {exc}") from exc


@functools.cache
def _field_kinds(kind: type[msgspec.Struct]) -> tuple[tuple[str, bool], ...]:
    """Each field's name and whether it travels as plain text; inspecting a type costs ~0.1 ms."""
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    text_types = (msgspec.inspect.StrType, msgspec.inspect.EnumType)
    return tuple((spec.name, isinstance(spec.type, text_types)) for spec in info.fields)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
