"""Event ids (event_ids.py): LMCache's shape, and which ids /check_finish may call finished without a record."""

from __future__ import annotations

import uuid

import pytest

from kvbus.controller import event_ids
from kvbus.controller.event_ids import Operation
from kvbus.shared.messages import CommandKind


def test_an_id_is_the_operation_s_lmcache_name_followed_by_a_fresh_uuid4() -> None:
    first, second = event_ids.new(Operation.CLEAR), event_ids.new(Operation.CLEAR)
    assert first.startswith("Clear") and first != second
    assert uuid.UUID(first.removeprefix("Clear")).version == 4
    assert event_ids.new(Operation.HEALTH).startswith("health")  # LMCache spells this one in lowercase


def test_an_id_s_uuid4_is_in_the_canonical_text_with_its_version_and_variant_bits() -> None:
    texts = [event_ids.new(Operation.LOOKUP).removeprefix("Lookup") for _ in range(2000)]
    parsed = [uuid.UUID(text) for text in texts]
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in parsed)
    assert [str(u) for u in parsed] == texts  # lower case, dashes where uuid prints them
    assert {text[19] for text in texts} == set("89ab")  # every variant digit turns up: the bits are random
    assert len(set(texts)) == len(texts)


def test_every_command_kind_has_its_operation() -> None:
    assert {kind: Operation.of(kind) for kind in CommandKind} == {
        CommandKind.CLEAR: "Clear",
        CommandKind.PIN: "Pin",
        CommandKind.UNPIN: "Unpin",
        CommandKind.COMPRESS: "Compress",
        CommandKind.DECOMPRESS: "Decompress",
        CommandKind.HEALTH: "health",
        CommandKind.MOVE: "Move",
    }


@pytest.mark.parametrize("operation", [Operation.LOOKUP, Operation.QUERY_WORKER_INFO, Operation.QUERY_INSTANCE])
def test_lookup_and_query_ids_are_answered_in_their_request(operation: Operation) -> None:
    assert event_ids.answered_in_request(event_ids.new(operation))


@pytest.mark.parametrize(
    "event_id",
    [
        event_ids.new(Operation.CLEAR),  # a command: it has a record, or it is unknown
        event_ids.new(Operation.HEALTH),
        "Lookup",
        "Lookup-nothing",
        f"Lookup{uuid.uuid1()}",  # not a uuid4
        f"Lookup{str(uuid.uuid4()).upper()}",  # not as this API writes it
        f"Lookup{{{uuid.uuid4()}}}",
        f"lookup{uuid.uuid4()}",
        f"QueryInstance{uuid.uuid4()}",
        f"x-Lookup{uuid.uuid4()}",
    ],
)
def test_other_ids_are_not(event_id: str) -> None:
    assert not event_ids.answered_in_request(event_id)
