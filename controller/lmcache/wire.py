"""LMCache 0.5.6's controller protocol, as its workers put it on ZMQ: msgpack maps tagged by class name.

Declared here from LMCache's wire format (recorded in tests/lmcache/message_vectors.json), not
imported from lmcache, so the controller needs no LMCache install. Each message is a Struct whose
tag (field `type`) is LMCache's class name; unknown extra fields are ignored, as LMCache's own
decoder ignores them. A payload that starts with `{` is JSON, which LMCache also accepts.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

import msgspec


class _Message(msgspec.Struct, tag_field="type", tag=True, kw_only=True):
    """Tagged by class name, as LMCache tags its messages."""


# Worker -> controller, on the reply (ROUTER) socket.
class RegisterMsg(_Message):
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None = None


class RegisterRetMsg(_Message):
    extra_config: dict[str, str] = msgspec.field(default_factory=dict)


class FullSyncStartMsg(_Message):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    total_keys: int
    batch_count: int


class FullSyncStartRetMsg(_Message):
    sync_id: str
    accepted: bool
    error_msg: str | None = None


class FullSyncStatusMsg(_Message):
    instance_id: str
    worker_id: int
    sync_id: str


class FullSyncStatusRetMsg(_Message):
    sync_id: str
    is_complete: bool
    global_progress: float
    can_exit_freeze: bool
    missing_batches: list[int] = msgspec.field(default_factory=list)


class BatchedP2PLookupMsg(_Message):
    hashes: list[int]
    instance_id: str
    worker_id: int


class BatchedP2PLookupRetMsg(_Message):
    # (instance_id, location, chunks held in a row, peer_init_url); ("", "", 0, "") for none
    layout_info: list[tuple[str, str, int, str]]


# Worker -> controller, on the heartbeat (ROUTER) socket.
class HeartbeatMsg(_Message):
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None = None


class FullSyncCommand(msgspec.Struct, tag_field="command_type", tag="full_sync", kw_only=True):
    reason: str
    args: dict[str, Any] | None = None


class HeartbeatRetMsg(_Message):
    commands: list[FullSyncCommand] = msgspec.field(default_factory=list)


# Worker -> controller, on the pull (PULL) socket: no reply.
class DeRegisterMsg(_Message):
    instance_id: str
    worker_id: int
    ip: str
    port: int


class OpType(StrEnum):
    ADMIT = "admit"
    EVICT = "evict"


class KVOpEvent(msgspec.Struct, kw_only=True):
    op_type: OpType
    key: int  # LMCache's chunk hash: a signed 64-bit int
    seq_num: int  # per worker and location, one up per op; a gap means ops were lost


class BatchedKVOperationMsg(_Message):
    instance_id: str
    worker_id: int
    location: str
    operations: list[KVOpEvent]


class FullSyncBatchMsg(_Message):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    batch_id: int
    keys: list[int]


class FullSyncEndMsg(_Message):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    actual_total_keys: int


# Controller -> worker, on the worker's REP socket, and the worker's answers.
class ClearWorkerMsg(_Message):
    worker_event_id: str
    location: str


class PinWorkerMsg(_Message):
    worker_event_id: str
    location: str
    tokens: list[int]


class CompressWorkerMsg(_Message):
    worker_event_id: str
    method: str
    location: str
    tokens: list[int] | None = None


class DecompressWorkerMsg(_Message):
    worker_event_id: str
    method: str
    location: str
    tokens: list[int] | None = None


class MoveWorkerMsg(_Message):
    worker_event_id: str
    old_position: str  # the source location
    new_position: tuple[str, str]  # (destination peer_init_url, destination location)
    tokens: list[int] | None = None
    copy: bool | None = True


class HealthWorkerMsg(_Message):
    worker_event_id: str


class ClearWorkerRetMsg(_Message):
    num_tokens: int


class PinWorkerRetMsg(_Message):
    num_tokens: int


class CompressWorkerRetMsg(_Message):
    num_tokens: int


class DecompressWorkerRetMsg(_Message):
    num_tokens: int


class MoveWorkerRetMsg(_Message):
    num_tokens: int


class HealthWorkerRetMsg(_Message):
    error_code: int


class ErrorMsg(_Message):
    error: str


FromWorkerReply = RegisterMsg | FullSyncStartMsg | FullSyncStatusMsg | BatchedP2PLookupMsg
FromWorkerPull = DeRegisterMsg | BatchedKVOperationMsg | FullSyncBatchMsg | FullSyncEndMsg
ToWorker = ClearWorkerMsg | PinWorkerMsg | CompressWorkerMsg | DecompressWorkerMsg | MoveWorkerMsg | HealthWorkerMsg
WorkerAnswer = (
    ClearWorkerRetMsg
    | PinWorkerRetMsg
    | CompressWorkerRetMsg
    | DecompressWorkerRetMsg
    | MoveWorkerRetMsg
    | HealthWorkerRetMsg
    | ErrorMsg
)

_T = TypeVar("_T")
_REPLY = msgspec.msgpack.Decoder(FromWorkerReply)
_PULL = msgspec.msgpack.Decoder(FromWorkerPull)
_HEARTBEAT = msgspec.msgpack.Decoder(HeartbeatMsg)
_ANSWER = msgspec.msgpack.Decoder(WorkerAnswer)
_JSON_REPLY = msgspec.json.Decoder(FromWorkerReply)
_JSON_PULL = msgspec.json.Decoder(FromWorkerPull)
_JSON_HEARTBEAT = msgspec.json.Decoder(HeartbeatMsg)
_JSON_ANSWER = msgspec.json.Decoder(WorkerAnswer)


class WireError(ValueError):
    """A frame that is not a message this socket takes."""


def encode(message: _Message | msgspec.Struct) -> bytes:
    return msgspec.msgpack.encode(message)


def decode_reply_socket(payload: bytes) -> FromWorkerReply:
    return _decode(payload, _REPLY, _JSON_REPLY)


def decode_pull_socket(payload: bytes) -> FromWorkerPull:
    return _decode(payload, _PULL, _JSON_PULL)


def decode_heartbeat_socket(payload: bytes) -> HeartbeatMsg:
    return _decode(payload, _HEARTBEAT, _JSON_HEARTBEAT)


def decode_answer(payload: bytes) -> WorkerAnswer:
    return _decode(payload, _ANSWER, _JSON_ANSWER)


def _decode(payload: bytes, packed: msgspec.msgpack.Decoder[_T], text: msgspec.json.Decoder[_T]) -> _T:
    try:
        # LMCache takes JSON too, from producers that are not LMCache workers.
        return text.decode(payload) if payload[:1] == b"{" else packed.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WireError(str(exc)) from None
