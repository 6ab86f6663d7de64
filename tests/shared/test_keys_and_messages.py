from __future__ import annotations

import pytest
from redis.crc import key_slot

from kvbus.shared import keys
from kvbus.shared.flat_fields import DecodeError, decode, encode
from kvbus.shared.locations import Location
from kvbus.shared.messages import Command, CommandKind, Result, ResultStatus


def test_every_per_instance_key_shares_the_instance_slot() -> None:
    instance = "inst-42"
    per_instance = [
        keys.info(instance),
        keys.alive(instance),
        keys.worker(instance, 3),
        keys.commands(instance),
        keys.index(instance, 1, Location.CPU),
        keys.heads(instance, 1, Location.DISK),
        keys.done(instance, 0, "Clear1"),
        keys.ticket(instance, bytes(32)),
    ]
    assert all(k.startswith("kvbus:{inst-42}:") for k in per_instance)
    assert {key_slot(k.encode()) for k in per_instance} == {key_slot(b"inst-42")}
    assert key_slot(keys.commands("inst-43").encode()) != key_slot(b"inst-42")


def test_script_key_parts_spell_the_keys_the_functions_spell() -> None:
    head, alive, workers, index = keys.script_key_parts()
    for instance_id in ("lmcache_default_instance", "a.b:c@d-e_f"):
        assert head + instance_id + alive == keys.alive(instance_id)
        assert head + instance_id + workers == keys.workers(instance_id)
        assert head + instance_id + index + "3:LocalDiskBackend" == keys.index(instance_id, 3, "LocalDiskBackend")


def test_command_records_spread_over_shards_each_in_one_slot() -> None:
    event_ids = [f"Clear{n}" for n in range(200)]
    shards = {keys.command_shard(event_id) for event_id in event_ids}
    assert shards == set(range(keys.COMMAND_SHARDS))
    for event_id in event_ids:
        shard = keys.command_shard(event_id)
        assert key_slot(keys.command_record(event_id).encode()) == key_slot(keys.command_records(shard).encode())
        assert keys.command_record(event_id) == keys.command_record_prefix(shard) + event_id
    slots = {key_slot(keys.command_records(shard).encode()) for shard in range(keys.COMMAND_SHARDS)}
    assert len(slots) == keys.COMMAND_SHARDS


def test_a_ticket_key_names_its_token_only_by_digest() -> None:
    token = bytes(range(32))
    key = keys.ticket("inst-42", token)
    assert token.hex() not in key and key != keys.ticket("inst-42", bytes(32))
    assert keys.ticket("inst-43", token) != key


def test_global_keys_are_prefixed() -> None:
    for key in (
        keys.INSTANCES,
        keys.HASH_SPACES,
        keys.LIFECYCLE,
        keys.JOURNAL,
        keys.command_record("Clear1"),
        keys.head(Location.CPU, "ab"),
        keys.results("c1"),
    ):
        assert key.startswith("kvbus:")


def test_messages_round_trip_as_readable_fields() -> None:
    command = Command(
        event_id="Clear1",
        kind=CommandKind.CLEAR,
        reply_to="kvbus:ctl:c:results",
        timeout_ms=5000,
        location="LocalCPUBackend",
    )
    fields = encode(command)
    assert fields == {
        "event_id": "Clear1",
        "kind": "clear",
        "reply_to": "kvbus:ctl:c:results",
        "timeout_ms": "5000",
        "location": "LocalCPUBackend",
    }
    assert decode(Command, {k.encode(): v.encode() for k, v in fields.items()}) == command
    result = Result(event_id="Clear1", instance_id="i", worker_id=0, status=ResultStatus.OK, num_tokens=12)
    assert decode(Result, encode(result)) == result


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "clear", "reply_to": "r", "timeout_ms": "1"},
        {"event_id": "e", "kind": "explode", "reply_to": "r", "timeout_ms": "1"},
        {"event_id": "e", "kind": "clear", "reply_to": "r", "timeout_ms": "soon"},
        {"event_id": "e", "kind": "clear", "reply_to": "r", "timeout_ms": "[1]"},
    ],
)
def test_invalid_commands_raise_decode_error(fields: dict[str, str]) -> None:
    with pytest.raises(DecodeError, match="not a valid Command"):
        decode(Command, fields)
