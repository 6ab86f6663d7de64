"""Every record kvbus keeps in Redis outside the command bus, as Structs: the one place that spells their fields.

The bus's own messages (commands and results) are in `messages.py`; `keys.py` names the keys
these records live at. Each record goes to and from Redis through `flat_fields`, so a field is
spelled once, here, and `redis-cli` shows it readable. `REDIS_VALUES` maps every key to what it
holds; a test checks docs/redis-keys.md against it.

Two words are kept apart: a *command record* is what /check_finish reads about one command
(`kvbus:{commands:<shard>}:command:<event_id>`), and a *lifecycle entry* is an agent registering, leaving, resyncing
or being reaped (`kvbus:lifecycle`).
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, ClassVar, Literal

import msgspec

from kvbus.shared.flat_fields import DecodeError, Fields, decode, encode, encode_some, text_of
from kvbus.shared.messages import Command, CommandKind, Result, ResultStatus


class BackendStats(msgspec.Struct, kw_only=True):
    """What one backend holds, as its worker's last heartbeat reported: only the agent knows bytes."""

    chunks: int = 0
    tokens: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    pinned_chunks: int = 0
    pinned_tokens: int = 0
    compressed_chunks: int = 0
    compressed_bytes: int = 0


class WorkerProtocol(StrEnum):
    """How a worker takes commands: a kvbus agent reads its instance's stream itself; an LMCache worker
    is sent each one over ZMQ, at ip:port, by a controller that reads the stream for it."""

    KVBUS = "kvbus"
    LMCACHE = "lmcache"


class WorkerRecord(msgspec.Struct, kw_only=True):
    """`kvbus:{inst}:worker:<id>`: one worker (tensor-parallel rank) as it registered and last heartbeated."""

    instance_id: str
    worker_id: int
    protocol: WorkerProtocol = WorkerProtocol.KVBUS
    ip: str = ""
    port: int | None = None  # lmcache_worker_ports, for the LMCache bridge
    peer_init_url: str = ""  # host:port other agents /move chunks into; empty without p2p_init_ports
    pid: int | None = None
    hostname: str = ""
    registration_time: float = 0.0
    last_heartbeat_time: float = 0.0  # the agent's own clock
    # What the bytes of this worker's chunks mean (model|dtype|block_size|backend) for engines that
    # store their own paged blocks; readers load only chunks of their layout. Empty for other agents.
    layout: str = ""
    stats: dict[str, BackendStats] | None = None  # location -> what it held at the last heartbeat

    HEARTBEAT_FIELD: ClassVar[str] = "last_heartbeat_time"  # what the relay reads alone, for many workers

    def encode(self) -> Fields:
        return encode(self)

    @classmethod
    def decode(cls, fields: dict[Any, Any]) -> WorkerRecord:
        return decode(cls, fields)

    @staticmethod
    def heartbeat(now: float, stats: dict[str, BackendStats] | None) -> Fields:
        """The fields each heartbeat rewrites. Written out, not by encode_some, whose check of the names an idle
        agent would pay for every second on cold caches; both are fields of this class."""
        if stats is None:
            return {WorkerRecord.HEARTBEAT_FIELD: text_of(now)}
        return {WorkerRecord.HEARTBEAT_FIELD: text_of(now), "stats": text_of(stats)}


class InstanceInfo(msgspec.Struct, kw_only=True):
    """`kvbus:{inst}:info`: what every worker of the instance shares: its hash space and locations."""

    model: str  # empty for LMCache engines, whose chunk keys do not depend on it
    chunk_size: int
    save_unfull_chunk: bool
    locations: list[str]
    hash_space: str = ""  # the name of the space its chunk keys are in (shared/hashing.py)

    SPACE_FIELD: ClassVar[str] = "hash_space"  # what the reaper reads alone

    def encode(self) -> Fields:
        return encode(self)

    @classmethod
    def decode(cls, fields: dict[Any, Any]) -> InstanceInfo:
        return decode(cls, fields)


class RecordedResult(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One worker's result inside a command record: what /check_finish reports, and nothing the record already holds.

    Kept as a JSON array without its trailing defaults (`["ok",12]`, `["ok"]` for no tokens;
    `CommandRecord.result_value`): a record lives as long as event_retention, and field names would be
    most of its bytes.
    """

    status: ResultStatus
    num_tokens: int = 0
    error_code: int = 0
    detail: str = ""

    @classmethod
    def of(cls, result: Result) -> RecordedResult:
        return cls(
            status=result.status, num_tokens=result.num_tokens, error_code=result.error_code, detail=result.detail
        )


_RESULT_DEFAULTS = [field.default for field in msgspec.structs.fields(RecordedResult)]


class CommandRecord(msgspec.Struct, kw_only=True):
    """`kvbus:command:<event_id>`: what /check_finish tells of a command, and nothing more: what it was, who
    must answer by when, and each worker's result once it answers.

    The controller writes it in the same script step that sends the command; `deadline_ms` (the
    command's stream entry id, Redis server time, plus its timeout) and `workers` (who must answer)
    are only known inside that script, which fills them in under the names `SCRIPT_FIELDS` gives it.
    Each worker adds its result under `result_field(worker_id)`. The journal keeps the rest (location,
    method, token count).
    """

    kind: CommandKind
    instance_id: str
    deadline_ms: int
    workers: list[int]
    results: dict[int, RecordedResult] = msgspec.field(default_factory=dict)

    SCRIPT_FIELDS: ClassVar[tuple[str, str]] = ("deadline_ms", "workers")

    @staticmethod
    def sent(command: Command, instance_id: str) -> Fields:
        """The fields the controller writes with the command, before the script adds `SCRIPT_FIELDS`."""
        return encode_some(CommandRecord, kind=command.kind, instance_id=instance_id)

    @staticmethod
    def result_field(worker_id: int) -> str:
        """Where a worker's result goes: under its id alone, since a field name costs its bytes in every record."""
        return str(worker_id)

    @staticmethod
    def result_value(result: Result | RecordedResult) -> str:
        recorded = result if isinstance(result, RecordedResult) else RecordedResult.of(result)
        items = msgspec.to_builtins(recorded)  # a list, in field order: RecordedResult is array_like
        while len(items) > 1 and items[-1] == _RESULT_DEFAULTS[len(items) - 1]:
            items.pop()  # decoding fills trailing fields left out with their defaults
        return msgspec.json.encode(items).decode()

    @classmethod
    def decode(cls, fields: dict[Any, Any]) -> CommandRecord:
        text = {_text(k): _text(v) for k, v in fields.items()}
        try:
            results = {
                int(name): msgspec.json.decode(value, type=RecordedResult)
                for name, value in text.items()
                if _is_worker_id(name)
            }
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise DecodeError(f"not a valid CommandRecord result: {exc}") from exc
        sent = {name: value for name, value in text.items() if not _is_worker_id(name)}
        return msgspec.structs.replace(decode(cls, sent), results=results)


class JournaledCommand(msgspec.Struct, kw_only=True):
    """A command as `kvbus:journal` keeps it: a token count stands in for the token list, which can be MBs."""

    type: Literal["command"] = "command"
    event_id: str
    instance_id: str
    kind: CommandKind
    location: str = ""
    method: str = ""
    dest_location: str = ""
    tokens: int = 0  # how many tokens the command named
    should_copy: bool = False

    @staticmethod
    def of(command: Command, instance_id: str) -> Fields:
        entry = JournaledCommand(
            event_id=command.event_id,
            instance_id=instance_id,
            kind=command.kind,
            location=command.location,
            method=command.method,
            dest_location=command.dest_location,
            tokens=len(command.tokens),
            should_copy=command.should_copy,
        )
        fields: Fields = {"type": "command", **encode(entry)}
        return fields


class JournaledResult(Result, frozen=True, kw_only=True):
    """A worker's result as `kvbus:journal` keeps it: the result's own fields."""

    type: Literal["result"] = "result"

    @staticmethod
    def of(result: Result) -> Fields:
        fields: Fields = {"type": "result", **encode(result)}
        return fields


JournalEntry = JournaledCommand | JournaledResult
_JOURNAL_TYPES: dict[str, type[JournalEntry]] = {"command": JournaledCommand, "result": JournaledResult}


def decode_journal(fields: dict[Any, Any]) -> JournalEntry:
    """A `kvbus:journal` entry as whichever of the two it is; raises DecodeError."""
    kind = next((_text(value) for name, value in fields.items() if _text(name) == "type"), "")
    entry_type = _JOURNAL_TYPES.get(kind)
    if entry_type is not None:
        return decode(entry_type, fields)
    raise DecodeError(f"journal entry of unknown type {kind!r}")


class LMCacheSync(msgspec.Struct, kw_only=True):
    """`kvbus:{inst}:lmcache:<worker_id>`: an LMCache worker's admit/evict sequence and full-sync state.

    LMCache numbers each worker's ops per location; a gap means ops were lost, so the rank's index
    at that location is dropped and the worker is asked (in its next heartbeat answer) to send all
    it holds again.
    """

    seq: dict[str, int] = msgspec.field(default_factory=dict)  # location -> last op's number
    resync_reason: str = ""  # set: the next heartbeat answer asks for a full sync
    gaps: int = 0  # sequence gaps seen since the worker registered
    sync_id: str = ""  # the full sync in progress or last finished
    sync_location: str = ""
    sync_batches: int = 0  # how many batches the worker said it would send
    sync_received: list[int] = msgspec.field(default_factory=list)
    sync_ended: bool = False

    @property
    def missing_batches(self) -> list[int]:
        return sorted(set(range(self.sync_batches)) - set(self.sync_received))

    @property
    def sync_complete(self) -> bool:
        return self.sync_ended and not self.missing_batches

    # What the controller's op script reads and writes, by name: the sequence, the gap count, the reason.
    SCRIPT_FIELDS: ClassVar[tuple[str, str, str]] = ("seq", "gaps", "resync_reason")

    def encode(self) -> Fields:
        return encode(self)

    @classmethod
    def decode(cls, fields: dict[Any, Any]) -> LMCacheSync:
        return decode(cls, fields)


class FleetEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One field of `kvbus:fleet:<shard>`, named `<worker_id>:<instance_id>`: what /metrics and the dashboard
    show of a worker, rewritten whole at each of its heartbeats (an agent's own, or the controller's for an
    LMCache worker), so that a scrape reads the fleet from a few hashes instead of every worker's keys.

    Stored as one JSON object, defaults left out. The worker's registration stays the truth: worker and
    key-count queries read that, and this entry is at most one heartbeat behind it.
    """

    last_heartbeat_time: float  # as the worker record has it
    protocol: WorkerProtocol = WorkerProtocol.KVBUS
    ip: str = ""
    hostname: str = ""
    pid: int | None = None
    stats: dict[str, BackendStats] | None = None  # the worker record's stats
    index: dict[str, int] = msgspec.field(default_factory=dict)  # location -> chunks in the rank's index (HLEN)
    unacked: int | None = None  # commands on the stream this worker has not acked; None without its group
    # Redis ms (an entry id's) of the oldest of those, so a reader ages it by its own clock; 0 when none.
    oldest_unacked_ms: int = 0
    lmcache: LMCacheSync | None = None  # an LMCache worker's op numbering and full-sync state

    def encode(self) -> bytes:
        return msgspec.json.encode(self)


class LifecycleKind(StrEnum):
    REGISTERED = "registered"
    DEREGISTERED = "deregistered"
    RESYNCED = "resynced"  # Redis had lost the agent's state; it re-registered and re-published
    REAPED = "reaped"  # removed by a controller after `reap_after` seconds without a heartbeat


class LifecycleEntry(msgspec.Struct, frozen=True, kw_only=True):
    """`kvbus:lifecycle`: an agent registering, leaving, resyncing or being reaped."""

    kind: LifecycleKind
    instance_id: str
    worker_id: int  # -1 when the entry is about the whole instance
    detail: str = ""

    def encode(self) -> Fields:
        return encode(self)

    @classmethod
    def decode(cls, fields: dict[Any, Any]) -> LifecycleEntry:
        return decode(cls, fields)


class ResultsOpened(msgspec.Struct, kw_only=True):
    """The first entry of a controller's result stream: it creates the stream, so agents can XADD NOMKSTREAM."""

    controller: str

    def encode(self) -> Fields:
        return encode(self)


class Working(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's sign, on the result stream, that it is still running a long command: the controller keeps
    waiting `command_timeout` from the newest sign (up to a bound), so a command is timed out when its
    worker goes quiet, not because its work is large or the machine loaded."""

    event_id: str
    worker_id: int
    working_ms: int  # how long the worker has run the command so far

    def encode(self) -> Fields:
        return encode(self)


def decode_result(fields: dict[Any, Any]) -> Result | Working | None:
    """An entry of a controller's result stream: a worker's result, a sign that it is still working on one,
    or None for the opening entry."""
    names = {_text(name) for name in fields}
    if names <= set(ResultsOpened.__struct_fields__):
        return None
    if names == set(Working.__struct_fields__):
        return decode(Working, fields)
    return decode(Result, fields)


def encode_stats(stats: dict[str, BackendStats]) -> str:
    return json.dumps(msgspec.to_builtins(stats), separators=(",", ":"))


def _is_worker_id(name: str) -> bool:
    return name.isascii() and name.isdigit()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class MoveTicket(msgspec.Struct, frozen=True, kw_only=True):
    """`kvbus:{<inst>}:ticket:<digest>`: what one ticket lets one source rank of a /move send into one rank of
    the instance. The controller writes it as it sends the command (controller/tickets.py); the receiving
    agent deletes it as it reads it, so it serves one transfer, and it expires with the command's deadline."""

    source_instance: str  # who was asked to send, for the receiver's log
    source_worker: int
    worker_id: int  # the receiving rank
    location: str  # where the chunks may go
    max_tokens: int = 0  # the tokens the /move named; 0: it named none, so every chunk the source holds there

    def encode(self) -> Fields:
        return encode(self)

    @classmethod
    def decode(cls, fields: dict[Any, Any]) -> MoveTicket:
        return decode(cls, fields)


# What every key holds: a Struct, or a plain value described in words. docs/redis-keys.md is checked against it.
REDIS_VALUES: dict[str, tuple[type[msgspec.Struct], ...] | str] = {
    "kvbus:{<inst>}:worker:<worker_id>": (WorkerRecord, BackendStats),
    "kvbus:{<inst>}:info": (InstanceInfo,),
    "kvbus:{<inst>}:lmcache:<worker_id>": (LMCacheSync,),
    "kvbus:{commands:<shard>}:command:<event_id>": (CommandRecord,),
    "kvbus:{commands:<shard>}:ids": "the event ids of the shard's command records kept, oldest first",
    "kvbus:journal": (JournaledCommand, JournaledResult),
    "kvbus:lifecycle": (LifecycleEntry,),
    "kvbus:{<inst>}:cmd": (Command,),
    "kvbus:ctl:<controller_id>:results": (Result, Working, ResultsOpened),
    "kvbus:{<inst>}:alive": "the id of the worker that heartbeated last",
    "kvbus:{<inst>}:worker:<worker_id>:wake": "A stopping agent pushes `stop`",
    "kvbus:{<inst>}:done:<worker_id>:<event_id>": "the token count a worker answered for a command",
    "kvbus:{<inst>}:idx:<worker_id>:<location>": "chunk key -> tokens in that chunk",
    "kvbus:{<inst>}:ticket:<digest>": (MoveTicket,),
    "kvbus:fleet:<shard>": (FleetEntry,),
}
