"""kvbus speaks LMCache 0.5.6's worker protocol byte for byte, checked against messages LMCache itself encoded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kvbus.controller.lmcache import wire

VECTORS = json.loads((Path(__file__).parents[2] / "lmcache" / "message_vectors.json").read_text())["messages"]
# LMCache 0.5.6 rejects the per-op messages and has no handler for check_finish on workers: kvbus declares none.
NOT_SPOKEN = {"KVAdmitMsg", "KVEvictMsg", "CheckFinishWorkerMsg", "CheckFinishWorkerRetMsg"}


def _spoken() -> list[dict[str, Any]]:
    return [m for m in VECTORS if m["class"] not in NOT_SPOKEN]


@pytest.mark.parametrize("vector", _spoken(), ids=lambda v: str(v["class"]))
def test_every_message_decodes_and_encodes_to_lmcaches_exact_bytes(vector: dict[str, Any]) -> None:
    recorded = bytes.fromhex(vector["msgpack_hex"])
    message = msgspec.msgpack.decode(recorded, type=getattr(wire, vector["class"]))
    assert wire.encode(message) == recorded


def test_each_socket_decodes_what_workers_send_it_and_refuses_the_rest() -> None:
    by_class = {m["class"]: bytes.fromhex(m["msgpack_hex"]) for m in VECTORS}
    assert isinstance(wire.decode_reply_socket(by_class["RegisterMsg"]), wire.RegisterMsg)
    assert isinstance(wire.decode_pull_socket(by_class["BatchedKVOperationMsg"]), wire.BatchedKVOperationMsg)
    assert isinstance(wire.decode_heartbeat_socket(by_class["HeartbeatMsg"]), wire.HeartbeatMsg)
    assert isinstance(wire.decode_answer(by_class["ClearWorkerRetMsg"]), wire.ClearWorkerRetMsg)
    for decode, wrong in (
        (wire.decode_pull_socket, "RegisterMsg"),
        (wire.decode_reply_socket, "BatchedKVOperationMsg"),
        (wire.decode_pull_socket, "KVAdmitMsg"),
    ):
        with pytest.raises(wire.WireError):
            decode(by_class[wrong])
    for garbage in (b"GET / HTTP/1.1\r\n", b"", b"\xc1"):
        with pytest.raises(wire.WireError):
            wire.decode_pull_socket(garbage)


def test_json_payloads_are_taken_as_lmcache_takes_them() -> None:
    payload = json.dumps(
        {"type": "DeRegisterMsg", "instance_id": "i", "worker_id": 0, "ip": "127.0.0.1", "port": 8001}
    ).encode()
    assert wire.decode_pull_socket(payload) == wire.DeRegisterMsg(
        instance_id="i", worker_id=0, ip="127.0.0.1", port=8001
    )
