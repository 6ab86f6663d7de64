"""Every JSON answer the controller gives, as Structs: what the routes return and what /openapi.json documents.

Fields typed `... | UnsetType` are left out of the JSON when unset, which is how LMCache's answers
stay field for field LMCache's while kvbus adds what it knows (a worker's pid, each rank's count).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType
from starlette.responses import Response

from kvbus.shared.records import BackendStats


class LookupAnswer(msgspec.Struct):
    event_id: str
    # instance id -> [location of the last matched chunk, tokens matched from the first]
    layout_info: dict[str, tuple[str, int]]


class TokenCountAnswer(msgspec.Struct):
    event_id: str
    num_tokens: int  # the smallest count of any rank
    num_tokens_per_worker: dict[str, int] | UnsetType = UNSET  # only when the instance's ranks disagree


class HealthAnswer(msgspec.Struct):
    event_id: str
    error_codes: dict[str, int]  # worker id -> 0 healthy, -1 memory check failed, -1001 the worker answered an error
    details: dict[str, str] | UnsetType = UNSET  # worker id -> why, for workers that said why


class WorkerOutcome(msgspec.Struct):
    status: str  # pending, or the worker's result status: ok, expired, error, refused
    num_tokens: int | UnsetType = UNSET
    error_code: int | UnsetType = UNSET
    detail: str | UnsetType = UNSET


class CommandStatus(StrEnum):
    PENDING = "pending"
    FINISHED = "finished"
    FAILED = "failed"  # a worker answered an error or a refusal
    EXPIRED = "expired"  # answered late, or unanswered 2 s past the deadline


class CheckFinishAnswer(msgspec.Struct):
    event_id: str
    status: CommandStatus
    kind: str | UnsetType = UNSET  # absent for lookups and queries
    instance_id: str | UnsetType = UNSET
    workers: dict[str, WorkerOutcome] | UnsetType = UNSET


class WorkerInfo(msgspec.Struct):
    """LMCache's worker_info, plus what kvbus records of the worker's process and layout."""

    instance_id: str
    worker_id: int
    ip: str
    port: int  # the worker's LMCache REP port (lmcache_worker_ports); 0 for a kvbus agent, which has none
    peer_init_url: str | None
    registration_time: float
    last_heartbeat_time: float
    pid: int | UnsetType = UNSET
    hostname: str | UnsetType = UNSET
    layout: str | UnsetType = UNSET
    key_count: int | UnsetType = UNSET  # in /controller/workers only


class QueryWorkerInfoAnswer(msgspec.Struct):
    event_id: str
    worker_infos: list[WorkerInfo]


class QueryInstanceAnswer(msgspec.Struct):
    event_id: str
    res: str | None


class InstanceKeyCount(msgspec.Struct):
    instance_id: str
    key_count: int
    worker_count: int


class KeyStatsAnswer(msgspec.Struct):
    total_key_count: int
    total_instance_count: int
    total_worker_count: int
    instances: list[InstanceKeyCount]


class WorkersAnswer(msgspec.Struct):
    workers: list[WorkerInfo]
    total_count: int


class HealthzAnswer(msgspec.Struct):
    status: Literal["ok"]
    controller_id: str


class DashboardWorker(msgspec.Struct):
    worker_id: int
    ip: str
    hostname: str
    pid: int | None
    heartbeat_age_s: float | None
    alive: bool
    stats: dict[str, BackendStats] | None
    unacked_commands: int | None
    oldest_unacked_age_s: float | None


class DashboardInstance(msgspec.Struct):
    instance_id: str
    alive: bool
    index_chunks: dict[str, int]
    workers_registered: int
    workers_alive: int
    workers: list[DashboardWorker]


class LookupCounts(msgspec.Struct):
    hits: int
    misses: int
    hit_ratio: float | None


class RecentCommand(msgspec.Struct):
    event_id: str
    time: float
    kind: str
    instance_id: str
    location: str
    method: str
    status: str  # /check_finish's status, or unknown past event_retention
    num_tokens: int | None
    workers: dict[str, WorkerOutcome]


class LifecycleView(msgspec.Struct):
    time: float
    kind: str
    instance_id: str
    worker_id: int
    detail: str


class DashboardAnswer(msgspec.Struct):
    controller_id: str
    now: float
    locations: list[str]
    instances: list[DashboardInstance]
    lookups: LookupCounts
    commands_answered: dict[str, dict[str, int]]  # kind -> outcome -> count, this process since it started
    recent_commands: list[RecentCommand]
    agent_events: list[LifecycleView]


class ValidationIssue(msgspec.Struct):
    """One entry of FastAPI's 422 `detail` list, as pydantic v2 words it."""

    type: str  # pydantic's error type: missing, int_parsing, list_type, json_invalid, ...
    loc: list[str | int]  # where: "body" (or "query") then the field names and list indexes
    msg: str
    input: Any  # the value that failed (for a missing field, the object that lacks it)
    ctx: dict[str, Any] | UnsetType = UNSET  # what some types add: max_length, the JSON error, ...


class ErrorAnswer(msgspec.Struct):
    # FastAPI's field, which LMCache clients read: a 422 lists every problem as FastAPI does, other errors say one.
    detail: str | list[ValidationIssue]
    error: str  # a stable code: see errors.py
    field: str | UnsetType = UNSET
    event_id: str | UnsetType = UNSET
    instance_id: str | UnsetType = UNSET
    path: str | UnsetType = UNSET


Answer = (
    LookupAnswer
    | TokenCountAnswer
    | HealthAnswer
    | CheckFinishAnswer
    | QueryWorkerInfoAnswer
    | QueryInstanceAnswer
    | KeyStatsAnswer
    | WorkersAnswer
    | WorkerInfo
    | HealthzAnswer
    | DashboardAnswer
    | ErrorAnswer
)


def respond(answer: Answer, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(answer), status_code, headers, media_type="application/json")
