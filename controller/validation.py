"""Request bodies read and validated as LMCache's FastAPI app does it: pydantic v2's lax mode, and its errors.

LMCache's request models are pydantic BaseModels behind FastAPI (0.141 with pydantic 2.14 in a fresh
LMCache 0.5.6 install). A client may therefore send whatever pydantic's lax mode converts (numeric
strings, whole floats and booleans for ints; "yes", "on" or 1 for a bool) and reads a refusal as
FastAPI's 422 `{"detail": [{type, loc, msg, input, ctx?}, ...]}`, with every problem listed. This
module does the same for the types kvbus's request Structs use (str, int, bool, list, tuple, and
X | None), reading each Struct's fields with msgspec.inspect, so schemas.py stays the one declaration
of a request. tests/controller/fastapi_validation.json holds FastAPI's own answers to many such
bodies (recorded by tests/controller/record_fastapi_validation.py); the tests replay them here.
"""

from __future__ import annotations

import email.message
import functools
import json
import math
import re
from collections.abc import Callable
from typing import Any

import msgspec
import msgspec.inspect as mi
from msgspec import UNSET

from kvbus.controller.answers import ValidationIssue

Loc = tuple[str | int, ...]


class Unreadable(Exception):
    """The body's bytes are no text JSON can decode: FastAPI answers 400, not 422."""


class Invalid(Exception):
    """What FastAPI answers 422 for, with pydantic's issues in order."""

    def __init__(self, issues: list[ValidationIssue]) -> None:
        super().__init__(issues[0].msg)
        self.issues = issues


class _Bad:
    """A value that failed; its issue is already recorded."""


_BAD = _Bad()

# Rust's str::trim, which pydantic-core applies before parsing a number: Unicode White_Space
# (Python's str.strip would also take \x1c-\x1f).
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
# pydantic-core reads an int from a string in two tries. First as a JSON integer, as it is; past
# 4300 digits that is int_parsing_size. Then cleaned: trimmed, a sign, single underscores between
# ASCII digits, leading zeros and a fraction of zeros only; past 4300 digits that is int_parsing.
_JSON_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_INT_TEXT = re.compile(r"([+-]?)([0-9](?:_?[0-9])*)(?:\.0+)?")
_MAX_INT_DIGITS = 4300  # pydantic-core's limit, Python's own for int(str)
_I64 = 2**63
_BOOL_WORDS = {
    **dict.fromkeys(("0", "off", "f", "false", "n", "no"), False),
    **dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
}
_MODEL_TYPE_MSG = "Input should be a valid dictionary or object to extract fields from"


def issue(kind: str, loc: Loc, msg: str, value: Any, **ctx: Any) -> ValidationIssue:
    return ValidationIssue(type=kind, loc=list(loc), msg=msg, input=value, ctx=ctx or UNSET)


def read_body(body: bytes) -> Any:
    """A JSON body as FastAPI hands it to validation; an empty body is None."""
    if not body:
        return None
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise Invalid([issue("json_invalid", ("body", exc.pos), "JSON decode error", {}, error=exc.msg)]) from None
    except ValueError as exc:  # undecodable bytes, an int of over 4300 digits (schemas.check_depth bounds nesting)
        raise Unreadable(str(exc)) from None


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this type as JSON: `application/json` and `application/*+json`."""
    if not content_type:
        return False
    return _is_json_type(content_type)


@functools.lru_cache(maxsize=256)  # clients send a handful of spellings; parsing one costs ~15 us a request
def _is_json_type(content_type: str) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def validate_body(value: Any, kind: type[msgspec.Struct]) -> dict[str, Any]:
    """The fields of `kind` read from the body `value` with pydantic's lax conversions, or Invalid."""
    if value is None:
        raise Invalid([issue("missing", ("body",), "Field required", None)])
    issues: list[ValidationIssue] = []
    fields = _model(value, mi.type_info(kind), ("body",), issues)
    if issues:
        raise Invalid(issues)
    assert isinstance(fields, dict)
    return fields


def validate_query_int(value: str, name: str) -> int:
    """A query parameter declared `int` (FastAPI reads it with the same lax rules), or Invalid."""
    issues: list[ValidationIssue] = []
    parsed = _int(value, ("query", name), issues)
    if isinstance(parsed, _Bad):
        raise Invalid(issues)
    return parsed


def _model(value: Any, model: mi.Type, loc: Loc, issues: list[ValidationIssue]) -> dict[str, Any] | _Bad:
    assert isinstance(model, mi.StructType)
    if not isinstance(value, dict):
        issues.append(issue("model_attributes_type", loc, _MODEL_TYPE_MSG, value))
        return _BAD
    fields: dict[str, Any] = {}
    for field in model.fields:
        if field.encode_name in value:
            fields[field.name] = _check(value[field.encode_name], field.type, (*loc, field.encode_name), issues)
        elif field.required:
            issues.append(issue("missing", (*loc, field.encode_name), "Field required", value))
    return fields


def _check(value: Any, kind: mi.Type, loc: Loc, issues: list[ValidationIssue]) -> Any:
    return _CHECKS[type(kind)](value, kind, loc, issues)


def _str(value: Any, kind: mi.Type, loc: Loc, issues: list[ValidationIssue]) -> str | _Bad:
    if isinstance(value, str):
        return value
    issues.append(issue("string_type", loc, "Input should be a valid string", value))
    return _BAD


def _int(value: Any, loc: Loc, issues: list[ValidationIssue]) -> int | _Bad:
    if isinstance(value, int):  # bool too: lax mode reads true as 1
        return int(value)
    if isinstance(value, float):
        return _int_from_float(value, loc, issues)
    if isinstance(value, str):
        return _int_from_str(value, loc, issues)
    issues.append(issue("int_type", loc, "Input should be a valid integer", value))
    return _BAD


def _int_from_float(value: float, loc: Loc, issues: list[ValidationIssue]) -> int | _Bad:
    if not math.isfinite(value):
        issues.append(issue("finite_number", loc, "Input should be a finite number", value))
    elif not value.is_integer():
        issues.append(
            issue("int_from_float", loc, "Input should be a valid integer, got a number with a fractional part", value)
        )
    elif abs(value) >= _I64:
        issues.append(_too_big(loc, value))
    else:
        return int(value)
    return _BAD


def _int_from_str(value: str, loc: Loc, issues: list[ValidationIssue]) -> int | _Bad:
    if _JSON_INT.fullmatch(value):
        if len(value.lstrip("-")) <= _MAX_INT_DIGITS:
            return int(value)
        issues.append(_too_big(loc, value))
        return _BAD
    found = _INT_TEXT.fullmatch(value.strip(_WHITE_SPACE))
    digits = found.group(2).replace("_", "").lstrip("0") if found else ""
    if found is None or len(digits) > _MAX_INT_DIGITS:
        issues.append(
            issue("int_parsing", loc, "Input should be a valid integer, unable to parse string as an integer", value)
        )
        return _BAD
    magnitude = int(digits or "0")
    return -magnitude if found.group(1) == "-" else magnitude


def _too_big(loc: Loc, value: Any) -> ValidationIssue:
    return issue("int_parsing_size", loc, "Unable to parse input string as an integer, exceeded maximum size", value)


def _int_field(value: Any, kind: mi.Type, loc: Loc, issues: list[ValidationIssue]) -> int | _Bad:
    return _int(value, loc, issues)


def _bool(value: Any, kind: mi.Type, loc: Loc, issues: list[ValidationIssue]) -> bool | _Bad:
    if isinstance(value, bool):
        return value
    word = _bool_word(value)
    if word is None:
        issues.append(issue("bool_type", loc, "Input should be a valid boolean", value))
    elif word not in _BOOL_WORDS:
        issues.append(issue("bool_parsing", loc, "Input should be a valid boolean, unable to interpret input", value))
    else:
        return _BOOL_WORDS[word]
    return _BAD


def _bool_word(value: Any) -> str | None:
    """What lax mode compares with its words: a string in any case, an int, or a whole float as that int."""
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, int):
        return str(value) if -_I64 <= value < _I64 else None  # a bigger int is no candidate at all
    if isinstance(value, float) and value.is_integer() and abs(value) < _I64:
        return str(int(value))
    return None


def _list(value: Any, kind: mi.Type, loc: Loc, issues: list[ValidationIssue]) -> list[Any] | _Bad:
    assert isinstance(kind, mi.ListType)
    if not isinstance(value, list):
        issues.append(issue("list_type", loc, "Input should be a valid list", value))
        return _BAD
    item_type = kind.item_type.type if isinstance(kind.item_type, mi.Metadata) else kind.item_type
    if isinstance(item_type, mi.IntType):  # token lists are long: the common case without a call per item
        return _int_list(value, loc, issues)
    return [_check(item, item_type, (*loc, n), issues) for n, item in enumerate(value)]


def _int_list(value: list[Any], loc: Loc, issues: list[ValidationIssue]) -> list[Any]:
    return [
        item if type(item) is int else _int(item, (*loc, n), issues)  # exact ints, nearly every item, pass as they are
        for n, item in enumerate(value)
    ]


def _tuple(value: Any, kind: mi.Type, loc: Loc, issues: list[ValidationIssue]) -> list[Any] | _Bad:
    assert isinstance(kind, mi.TupleType)
    if not isinstance(value, list):
        issues.append(issue("tuple_type", loc, "Input should be a valid tuple", value))
        return _BAD
    size = len(kind.item_types)
    if len(value) > size:
        msg = f"Tuple should have at most {size} items after validation, not {len(value)}"
        issues.append(issue("too_long", loc, msg, value, field_type="Tuple", max_length=size, actual_length=len(value)))
        return _BAD
    items = []
    for n, item_type in enumerate(kind.item_types):
        if n < len(value):
            items.append(_check(value[n], item_type, (*loc, n), issues))
        else:
            issues.append(issue("missing", (*loc, n), "Field required", value))
    return items


def _optional(value: Any, kind: mi.Type, loc: Loc, issues: list[ValidationIssue]) -> Any:
    assert isinstance(kind, mi.UnionType)
    if value is None:
        return None
    (inner,) = (t for t in kind.types if not isinstance(t, mi.NoneType))
    return _check(value, inner, loc, issues)


def _annotated(value: Any, kind: mi.Type, loc: Loc, issues: list[ValidationIssue]) -> Any:
    """A type annotated for the schema only: an enum it documents, not one it enforces."""
    assert isinstance(kind, mi.Metadata)
    return _check(value, kind.type, loc, issues)


_CHECKS: dict[type[mi.Type], Callable[[Any, mi.Type, Loc, list[ValidationIssue]], Any]] = {
    mi.StrType: _str,
    mi.IntType: _int_field,
    mi.BoolType: _bool,
    mi.ListType: _list,
    mi.TupleType: _tuple,
    mi.UnionType: _optional,
    mi.StructType: lambda value, kind, loc, issues: _model(value, kind, loc, issues),
    mi.Metadata: _annotated,
}
