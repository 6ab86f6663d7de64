"""Print how LMCache 0.5.6 puts each controller-protocol message on the wire, so that kvbus can speak it
without importing lmcache.

Run: .venv-lmcache/bin/python tests/lmcache/probe_messages.py [--write]
For each message: its class and module, its fields (name, type, default), an example, and the example's
bytes as LMCache encodes them (msgspec.msgpack.encode, the module-level function; LMCache builds no Encoder
or Decoder object and decodes with msgspec.msgpack.decode(data, type=Msg)). `--write` also saves all of it to
tests/lmcache/message_vectors.json. Last come a few checks of what LMCache's decoder tolerates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import harness

VECTORS = Path(__file__).with_name("message_vectors.json")


def examples() -> list[Any]:
    """One example of every message a worker or the controller puts on a ZMQ socket."""
    from lmcache.v1.cache_controller.commands.full_sync import FullSyncCommand
    from lmcache.v1.cache_controller.message import (
        BatchedKVOperationMsg,
        BatchedP2PLookupMsg,
        BatchedP2PLookupRetMsg,
        CheckFinishWorkerMsg,
        CheckFinishWorkerRetMsg,
        ClearWorkerMsg,
        ClearWorkerRetMsg,
        CompressWorkerMsg,
        CompressWorkerRetMsg,
        DecompressWorkerMsg,
        DecompressWorkerRetMsg,
        DeRegisterMsg,
        ErrorMsg,
        FullSyncBatchMsg,
        FullSyncEndMsg,
        FullSyncStartMsg,
        FullSyncStartRetMsg,
        FullSyncStatusMsg,
        FullSyncStatusRetMsg,
        HealthWorkerMsg,
        HealthWorkerRetMsg,
        HeartbeatMsg,
        HeartbeatRetMsg,
        KVAdmitMsg,
        KVEvictMsg,
        KVOpEvent,
        MoveWorkerMsg,
        MoveWorkerRetMsg,
        OpType,
        PinWorkerMsg,
        PinWorkerRetMsg,
        RegisterMsg,
        RegisterRetMsg,
    )

    inst, wid = "lmcache_default_instance", 0
    # A negative and a large positive chunk hash: builtin hash() gives signed 64-bit ints.
    h1, h2 = -4153336478567301734, 8123456789012345678
    return [
        RegisterMsg(instance_id=inst, worker_id=wid, ip="127.0.0.1", port=8001, peer_init_url=None),
        RegisterMsg(instance_id=inst, worker_id=1, ip="127.0.0.1", port=8002, peer_init_url="127.0.0.1:8201"),
        RegisterRetMsg(),
        RegisterRetMsg(extra_config={"heartbeat_url": "127.0.0.1:8500"}),
        DeRegisterMsg(instance_id=inst, worker_id=wid, ip="127.0.0.1", port=8001),
        HeartbeatMsg(instance_id=inst, worker_id=wid, ip="127.0.0.1", port=8001, peer_init_url=None),
        HeartbeatRetMsg(),
        HeartbeatRetMsg(commands=[FullSyncCommand(reason="controller_restart")]),
        BatchedKVOperationMsg(
            instance_id=inst,
            worker_id=wid,
            location="LocalCPUBackend",
            operations=[
                KVOpEvent(op_type=OpType.ADMIT, key=h1, seq_num=0),
                KVOpEvent(op_type=OpType.EVICT, key=h2, seq_num=1),
            ],
        ),
        KVAdmitMsg(instance_id=inst, worker_id=wid, key=h1, location="LocalCPUBackend", seq_num=0),
        KVEvictMsg(instance_id=inst, worker_id=wid, key=h1, location="LocalCPUBackend", seq_num=1),
        BatchedP2PLookupMsg(hashes=[h1, h2], instance_id=inst, worker_id=wid),
        BatchedP2PLookupRetMsg(layout_info=[("", "", 0, "")]),
        FullSyncStartMsg(
            instance_id=inst, worker_id=wid, location="LocalCPUBackend", sync_id="sync-1", total_keys=2, batch_count=1
        ),
        FullSyncStartRetMsg(sync_id="sync-1", accepted=True),
        FullSyncBatchMsg(
            instance_id=inst, worker_id=wid, location="LocalCPUBackend", sync_id="sync-1", batch_id=0, keys=[h1, h2]
        ),
        FullSyncEndMsg(
            instance_id=inst, worker_id=wid, location="LocalCPUBackend", sync_id="sync-1", actual_total_keys=2
        ),
        FullSyncStatusMsg(instance_id=inst, worker_id=wid, sync_id="sync-1"),
        FullSyncStatusRetMsg(sync_id="sync-1", is_complete=True, global_progress=1.0, can_exit_freeze=True),
        ClearWorkerMsg(worker_event_id="Worker0Clear0b1c", location="LocalCPUBackend"),
        ClearWorkerRetMsg(num_tokens=612),
        PinWorkerMsg(worker_event_id="Worker0Pin0b1c", location="LocalCPUBackend", tokens=[128000, 849, 21435]),
        PinWorkerRetMsg(num_tokens=3),
        CompressWorkerMsg(worker_event_id="CompressWorker0x", method="cachegen", location="LocalCPUBackend", tokens=[]),
        CompressWorkerRetMsg(num_tokens=0),
        DecompressWorkerMsg(worker_event_id="DecompressWorker0x", method="cachegen", location="LocalCPUBackend"),
        DecompressWorkerRetMsg(num_tokens=0),
        MoveWorkerMsg(
            worker_event_id="MoveWorker0x",
            old_position="LocalCPUBackend",
            new_position=("127.0.0.1:8201", "LocalCPUBackend"),
            tokens=[],
            copy=False,
        ),
        MoveWorkerRetMsg(num_tokens=0),
        HealthWorkerMsg(worker_event_id="HealthWorker0x"),
        HealthWorkerRetMsg(error_code=0),
        CheckFinishWorkerMsg(worker_event_id="Worker0x"),
        CheckFinishWorkerRetMsg(status="finished"),
        ErrorMsg(error="Worker error: boom"),
    ]


def type_name(annotation: Any) -> str:
    # Plain classes by name; generics (list[int], Optional[...]) by their full spelling.
    name = annotation.__name__ if type(annotation) is type else str(annotation)
    return name.replace("typing.", "").replace("lmcache.v1.cache_controller.", "")


def describe(message: Any) -> dict[str, Any]:
    import msgspec

    cls = type(message)
    config = cls.__struct_config__
    fields = [
        {
            "name": f.name,
            "type": type_name(f.type),
            "default": None
            if f.required
            else repr(f.default_factory() if f.default is msgspec.NODEFAULT else f.default),
            "required": f.required,
        }
        for f in msgspec.structs.fields(cls)
    ]
    data = msgspec.msgpack.encode(message)
    return {
        "class": cls.__name__,
        "module": cls.__module__,
        "tag_field": config.tag_field,
        "tag": config.tag,
        "fields": fields,
        "example": msgspec.to_builtins(message),
        "msgpack_hex": data.hex(),
        "msgpack_as_map": msgspec.msgpack.decode(data),
    }


def tolerance_checks() -> list[tuple[str, str]]:
    """What msgspec.msgpack.decode(data, type=Msg) accepts: the bounds of a compatible encoder."""
    import msgspec
    from lmcache.v1.cache_controller.message import Msg

    def attempt(payload: dict[str, Any]) -> str:
        try:
            return f"accepted as {type(msgspec.msgpack.decode(msgspec.msgpack.encode(payload), type=Msg)).__name__}"
        except msgspec.ValidationError as exc:
            return f"rejected: {exc}"

    clear = {"type": "ClearWorkerMsg", "worker_event_id": "e", "location": "LocalCPUBackend"}
    return [
        (
            "tag as the last key",
            attempt({"worker_event_id": "e", "location": "LocalCPUBackend", "type": "ClearWorkerMsg"}),
        ),
        ("unknown extra field", attempt({**clear, "deadline": 1.5})),
        ("missing required field", attempt({"type": "ClearWorkerMsg", "worker_event_id": "e"})),
        ("no tag", attempt({"worker_event_id": "e", "location": "LocalCPUBackend"})),
        ("unknown tag", attempt({**clear, "type": "UnpinWorkerMsg"})),
        ("int field sent as float", attempt({"type": "ClearWorkerRetMsg", "num_tokens": 12.0})),
        ("int field sent as string", attempt({"type": "ClearWorkerRetMsg", "num_tokens": "12"})),
        ("op_type as upper-case name", attempt(batch_with_op("ADMIT"))),
        ("op_type as value", attempt(batch_with_op("admit"))),
        (
            "FullSyncCommand missing reason/args",
            attempt({"type": "HeartbeatRetMsg", "commands": [{"command_type": "full_sync"}]}),
        ),
        ("HeartbeatRetMsg without commands", attempt({"type": "HeartbeatRetMsg"})),
        (
            "RegisterMsg without peer_init_url",
            attempt({"type": "RegisterMsg", "instance_id": "i", "worker_id": 0, "ip": "h", "port": 1}),
        ),
    ]


def batch_with_op(op: str) -> dict[str, Any]:
    operation = {"op_type": op, "key": 1, "seq_num": 0}
    return {
        "type": "BatchedKVOperationMsg",
        "instance_id": "i",
        "worker_id": 0,
        "location": "L",
        "operations": [operation],
    }


def main() -> None:
    harness.require_lmcache_venv()
    described = [describe(message) for message in examples()]
    for entry in described:
        fields = ", ".join(
            f"{f['name']}: {f['type']}" + ("" if f["required"] else f" = {f['default']}") for f in entry["fields"]
        )
        print(f"{entry['class']}  ({entry['module']}; tag {entry['tag_field']}={entry['tag']!r})")
        print(f"  fields: {fields}")
        print(f"  map:    {json.dumps(entry['msgpack_as_map'])}")
        print(f"  bytes:  {entry['msgpack_hex']}")
    print("\ndecoder tolerance (msgspec.msgpack.decode(data, type=Msg)):")
    checks = tolerance_checks()
    for what, outcome in checks:
        print(f"  {what}: {outcome}")
    if "--write" in sys.argv[1:]:
        document = {"messages": described, "decoder_checks": [{"case": w, "outcome": o} for w, o in checks]}
        harness.write_json(VECTORS, document)
        print(f"\nwrote {VECTORS}")


if __name__ == "__main__":
    main()
