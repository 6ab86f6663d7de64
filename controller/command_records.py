"""/check_finish's view of command records: each command's record in Redis, read into one status.

The controller writes a record when it sends a command (bus.py) and every worker writes its
result into it when it answers (agent/consumer.py), so any replica can tell any command's
outcome, even one whose controller gave up with a 504 or has since died. Lookups and queries
are not stored: `event_ids` tells them apart by their id.
"""

from __future__ import annotations

import asyncio
from typing import cast

from kvbus.controller import event_ids
from kvbus.controller.answers import CheckFinishAnswer, CommandStatus, WorkerOutcome
from kvbus.controller.errors import UnknownEvent
from kvbus.shared import keys, redis_conn
from kvbus.shared.flat_fields import DecodeError
from kvbus.shared.messages import Result, ResultStatus
from kvbus.shared.records import CommandRecord, RecordedResult

# A command not answered by every worker this long after its deadline never will be: agents
# answer late commands "expired" and never execute them.
_LATE_GRACE_MS = 2000


async def check(client: redis_conn.AsyncClient, event_id: str) -> CheckFinishAnswer:
    fields, now_ms = await asyncio.gather(client.hgetall(keys.command_record(event_id)), redis_conn.server_ms(client))
    record = read(cast(dict[str, str], fields))  # the client decodes replies
    if record is not None:
        return describe(event_id, record, now_ms)
    if event_ids.answered_in_request(event_id):
        return CheckFinishAnswer(event_id=event_id, status=CommandStatus.FINISHED)
    raise UnknownEvent(
        f"no event {event_id!r}: it was never created, or it is older than event_retention or than the "
        "newest event_retention_count commands",
        event_id=event_id,
    )


def read(fields: dict[str, str]) -> CommandRecord | None:
    """The record in a command record's fields, or None when there is none to tell of.

    A worker that answers after its record expired or was trimmed writes its result alone (replies.py
    gives that stub the retention, so it does not leak): the command is past retention all the same.
    """
    try:
        return CommandRecord.decode(fields) if fields else None
    except DecodeError:
        return None


def describe(event_id: str, record: CommandRecord, now_ms: int) -> CheckFinishAnswer:
    """/check_finish's answer for a command record, as of Redis time `now_ms` (the dashboard reads many)."""
    results = {w: record.results[w] for w in record.workers if w in record.results}
    overdue = now_ms > record.deadline_ms + _LATE_GRACE_MS
    status = _status(results, complete=len(results) == len(record.workers), overdue=overdue)
    return CheckFinishAnswer(
        event_id=event_id,
        status=status,
        kind=str(record.kind),
        instance_id=record.instance_id,
        workers={str(w): outcome(results.get(w)) for w in record.workers},
    )


def _status(results: dict[int, RecordedResult], *, complete: bool, overdue: bool) -> CommandStatus:
    statuses = {r.status for r in results.values()}
    if statuses & {ResultStatus.ERROR, ResultStatus.REFUSED}:
        return CommandStatus.FAILED
    if ResultStatus.EXPIRED in statuses or (not complete and overdue):
        return CommandStatus.EXPIRED
    return CommandStatus.FINISHED if complete else CommandStatus.PENDING


def outcome(result: RecordedResult | Result | None) -> WorkerOutcome:
    if result is None:
        return WorkerOutcome(status=CommandStatus.PENDING.value)
    return WorkerOutcome(
        status=str(result.status), num_tokens=result.num_tokens, error_code=result.error_code, detail=result.detail
    )
