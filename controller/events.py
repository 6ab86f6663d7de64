"""The event table behind /check_finish: each command's record in Redis, read into one status.

The controller writes a record when it sends a command (bus.py) and every worker writes its
result into it when it answers (agent/consumer.py), so any replica can tell any event's
outcome, even one whose controller gave up with a 504 or has since died.

Lookups and queries are answered in the request that creates their event id, so they are
finished by construction; they are recognised by the id's shape and not stored, which keeps
the lookup path free of writes.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Any

import redis.asyncio

from kvbus.controller.errors import UnknownEvent
from kvbus.shared import keys
from kvbus.shared.messages import Result, ResultStatus, decode

# A command not answered by every worker this long after its deadline never will be: agents
# answer late commands "expired" and never execute them.
_LATE_GRACE_MS = 2000
_ANSWERED_IN_REQUEST = re.compile(
    r"(Lookup|QueryWorkerInfo|QueryInst)[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)


class EventStatus(StrEnum):
    PENDING = "pending"
    FINISHED = "finished"
    FAILED = "failed"
    EXPIRED = "expired"


async def check(client: redis.asyncio.Redis, event_id: str) -> dict[str, Any]:
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.event(event_id))
    pipe.time()
    record, (seconds, micros) = await pipe.execute()
    if not record:
        if _ANSWERED_IN_REQUEST.fullmatch(event_id):
            return {"event_id": event_id, "status": EventStatus.FINISHED}
        raise UnknownEvent(
            f"no event {event_id!r}: it was never created, or it is older than event_retention", event_id=event_id
        )
    return describe(event_id, record, seconds * 1000 + micros // 1000)


def describe(event_id: str, record: dict[str, str], now_ms: int) -> dict[str, Any]:
    """/check_finish's answer for a stored event record, as of Redis time `now_ms` (the dashboard reads many)."""
    workers: list[int] = json.loads(record["workers"])
    results = {
        w: decode(Result, json.loads(record[keys.event_result_field(w)]))
        for w in workers
        if keys.event_result_field(w) in record
    }
    deadline_ms = int(record["entry_id"].split("-", 1)[0]) + int(record["timeout_ms"])
    overdue = now_ms > deadline_ms + _LATE_GRACE_MS
    return {
        "event_id": event_id,
        "status": _status(results, complete=len(results) == len(workers), overdue=overdue),
        "kind": record["kind"],
        "instance_id": record["instance_id"],
        "workers": {str(w): _worker(results.get(w)) for w in workers},
    }


def _status(results: dict[int, Result], *, complete: bool, overdue: bool) -> EventStatus:
    statuses = {r.status for r in results.values()}
    if statuses & {ResultStatus.ERROR, ResultStatus.REFUSED}:
        return EventStatus.FAILED
    if ResultStatus.EXPIRED in statuses or (not complete and overdue):
        return EventStatus.EXPIRED
    return EventStatus.FINISHED if complete else EventStatus.PENDING


def _worker(result: Result | None) -> dict[str, Any]:
    if result is None:
        return {"status": "pending"}
    return {
        "status": str(result.status),
        "num_tokens": result.num_tokens,
        "error_code": result.error_code,
        "detail": result.detail,
    }
