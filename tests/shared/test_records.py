"""Every record kvbus keeps in Redis round-trips through its Struct, and docs/redis-keys.md describes each one."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from kvbus.shared import keys
from kvbus.shared.flat_fields import DecodeError, encode, field_names
from kvbus.shared.messages import Command, CommandKind, Result, ResultStatus
from kvbus.shared.records import (
    REDIS_VALUES,
    BackendStats,
    CommandRecord,
    InstanceInfo,
    JournaledCommand,
    JournaledResult,
    LifecycleEntry,
    LifecycleKind,
    MoveTicket,
    RecordedResult,
    ResultsOpened,
    WorkerRecord,
    decode_journal,
    decode_result,
)

DOCS = Path(__file__).parents[2] / "docs" / "redis-keys.md"


def test_a_worker_record_round_trips_and_leaves_defaults_out() -> None:
    record = WorkerRecord(instance_id="i", worker_id=1, ip="10.0.0.7", pid=42, registration_time=1.5)
    fields = record.encode()
    assert fields == {"instance_id": "i", "worker_id": "1", "ip": "10.0.0.7", "pid": "42", "registration_time": "1.5"}
    assert WorkerRecord.decode({k.encode(): v.encode() for k, v in fields.items()}) == record


def test_a_heartbeat_rewrites_only_its_fields_and_they_decode_with_the_rest() -> None:
    stats = {"LocalCPUBackend": BackendStats(chunks=3, tokens=600, bytes=1024)}
    beat = WorkerRecord.heartbeat(7.25, stats)
    assert beat.keys() == {"last_heartbeat_time", "stats"}
    record = WorkerRecord.decode({**WorkerRecord(instance_id="i", worker_id=0).encode(), **beat})
    assert record.last_heartbeat_time == 7.25 and record.stats == stats
    assert WorkerRecord.heartbeat(1.0, None).keys() == {"last_heartbeat_time"}


def test_a_worker_hash_that_is_not_a_worker_record_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="WorkerRecord"):
        WorkerRecord.decode({"instance_id": "i"})
    with pytest.raises(DecodeError):
        WorkerRecord.decode({"instance_id": "i", "worker_id": "one"})


def test_instance_info_round_trips() -> None:
    info = InstanceInfo(model="m", chunk_size=256, save_unfull_chunk=True, locations=["LocalCPUBackend"])
    assert InstanceInfo.decode(info.encode()) == info


def test_a_command_record_gathers_the_sent_fields_and_each_workers_result() -> None:
    command = Command(event_id="Clear1", kind=CommandKind.CLEAR, reply_to="r", timeout_ms=5000, location="L")
    done = Result(event_id="Clear1", instance_id="i", worker_id=1, status=ResultStatus.OK, num_tokens=12)
    fields = {
        **CommandRecord.sent(command, "i"),
        CommandRecord.SCRIPT_FIELDS[0]: "1700000005000",
        CommandRecord.SCRIPT_FIELDS[1]: "[0,1]",
        CommandRecord.result_field(1): CommandRecord.result_value(done),
    }
    # What /check_finish needs and no more: the location and timeout are the journal's.
    assert fields.keys() == {"kind", "instance_id", "deadline_ms", "workers", "1"}
    record = CommandRecord.decode(fields)
    assert (record.kind, record.instance_id, record.workers) == (CommandKind.CLEAR, "i", [0, 1])
    assert record.results == {1: RecordedResult(status=ResultStatus.OK, num_tokens=12)}
    assert record.deadline_ms == 1700000000000 + 5000
    with pytest.raises(DecodeError):
        CommandRecord.decode({**fields, CommandRecord.result_field(0): "{not json"})


@pytest.mark.parametrize(
    ("result", "stored"),
    [
        (RecordedResult(status=ResultStatus.OK, num_tokens=12), '["ok",12]'),
        (RecordedResult(status=ResultStatus.OK), '["ok"]'),
        (RecordedResult(status=ResultStatus.OK, error_code=-1), '["ok",0,-1]'),
        (RecordedResult(status=ResultStatus.ERROR, detail="OSError: x"), '["error",0,0,"OSError: x"]'),
    ],
)
def test_a_recorded_result_is_an_array_without_its_trailing_defaults(result: RecordedResult, stored: str) -> None:
    assert CommandRecord.result_value(result) == stored
    assert CommandRecord.decode(
        {"kind": "clear", "instance_id": "i", "deadline_ms": "1", "workers": "[0]", "0": stored}
    ).results == {0: result}


def test_journal_entries_say_which_they_are_and_carry_a_token_count_not_the_tokens() -> None:
    command = Command(event_id="Pin1", kind=CommandKind.PIN, reply_to="r", timeout_ms=5000, tokens=list(range(300)))
    entry = decode_journal(JournaledCommand.of(command, "i"))
    assert isinstance(entry, JournaledCommand) and entry.tokens == 300 and entry.instance_id == "i"
    result = Result(event_id="Pin1", instance_id="i", worker_id=0, status=ResultStatus.REFUSED, detail="no")
    journaled = decode_journal(JournaledResult.of(result))
    assert isinstance(journaled, JournaledResult) and journaled.detail == "no" and journaled.worker_id == 0
    with pytest.raises(DecodeError, match="unknown type"):
        decode_journal({"type": "gossip"})


def test_lifecycle_entries_and_the_result_streams_opening_entry() -> None:
    entry = LifecycleEntry(kind=LifecycleKind.REAPED, instance_id="i", worker_id=-1, detail="silent")
    assert LifecycleEntry.decode(entry.encode()) == entry
    assert decode_result(ResultsOpened(controller="c1").encode()) is None
    result = Result(event_id="e", instance_id="i", worker_id=0, status=ResultStatus.OK)
    assert decode_result(encode(result)) == result


def _row(doc: str, key: str) -> str:
    rows = [line for line in doc.splitlines() if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"docs/redis-keys.md has no row (or several) for {key}"
    return rows[0]


def _stored_fields(kind: type[msgspec.Struct]) -> set[str]:
    if kind is CommandRecord:  # results are stored one field per worker, under its id
        return set(field_names(kind)) - {"results"}
    return set(field_names(kind))


def test_a_move_ticket_round_trips_and_leaves_an_unbounded_token_count_out() -> None:
    ticket = MoveTicket(source_instance="src", source_worker=1, worker_id=1, location="LocalCPUBackend")
    fields = ticket.encode()
    assert fields == {"source_instance": "src", "source_worker": "1", "worker_id": "1", "location": "LocalCPUBackend"}
    assert MoveTicket.decode({k.encode(): v.encode() for k, v in fields.items()}) == ticket
    with pytest.raises(DecodeError, match="MoveTicket"):
        MoveTicket.decode({"source_instance": "src"})


@pytest.mark.parametrize("key", sorted(REDIS_VALUES))
def test_the_docs_describe_every_value_field_by_field(key: str) -> None:
    row = _row(DOCS.read_text(), key)
    value = REDIS_VALUES[key]
    if isinstance(value, str):
        assert value in row
        return
    for kind in value:
        missing = {name for name in _stored_fields(kind) if not re.search(rf"\b{re.escape(name)}", row)}
        assert not missing, f"the row of {key} does not name {sorted(missing)} of {kind.__name__}"


def test_every_key_the_keys_module_spells_is_documented() -> None:
    doc = DOCS.read_text()
    spelled = [keys.INSTANCES, keys.HASH_SPACES, keys.LOCATIONS, keys.LIFECYCLE, keys.JOURNAL, keys.REAPER_LOCK]
    for key in spelled:
        assert f"`{key}`" in doc, key
