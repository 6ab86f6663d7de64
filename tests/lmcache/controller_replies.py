"""What LMCache 0.5.6's own controller answers on its ZMQ sockets, asked by a worker made of bare pyzmq sockets
and msgpack maps (no lmcache classes): the other half of cpu_worker.py.

Run: .venv-lmcache/bin/python tests/lmcache/controller_replies.py [--write]
Covers registration, admits, heartbeats with the full-sync command, a whole full sync, P2P lookup, frames the
controller cannot decode, JSON payloads, commands sent to the worker's REP socket (its answers scripted here)
and deregistration. `--write` saves every exchange to tests/lmcache/controller_replies.json.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import httpx
import msgspec
import zmq

OUT = Path(__file__).with_name("controller_replies.json")
INSTANCE = "fake_inst"
# The chunk hashes LMCache gives the seed prompt and tokens 1000..1599 (hash_vectors.json, no vLLM).
SEED_HASH = 4690244967161877535
RANGE_HASHES = [-9006915360733114755, 6249281391258955993, -8949972916775179974]
SEED_PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
RECV_TIMEOUT_MS = 10_000


@dataclass
class FakeWorker:
    """One worker's sockets: PUSH and DEALER to the controller, REP for its commands (answers scripted)."""

    controller: harness.Controller
    rep_port: int = field(default_factory=harness.free_port)
    exchanges: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)  # what reached the REP socket
    answers: list[bytes] = field(default_factory=list)  # what the REP socket answers, in order

    def __post_init__(self) -> None:
        self.context = zmq.Context()
        self.push = self._socket(zmq.PUSH, self.controller.pull)
        self.dealer = self._socket(zmq.DEALER, self.controller.reply)
        self.heartbeat = self._socket(zmq.DEALER, self.controller.heartbeat)
        self.rep = self.context.socket(zmq.REP)
        self.rep.setsockopt(zmq.RCVTIMEO, 200)
        self.rep.bind(f"tcp://127.0.0.1:{self.rep_port}")
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve_commands, daemon=True)
        self.thread.start()

    def _socket(self, kind: int, port: int) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.context.socket(kind)
        sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        return sock

    def _serve_commands(self) -> None:
        while not self.stopping.is_set():
            try:
                request = self.rep.recv()
            except zmq.Again:
                continue
            self.commands.append({"message": msgspec.msgpack.decode(request), "msgpack_hex": request.hex()})
            answer = self.answers.pop(0) if self.answers else msgspec.msgpack.encode({"type": "ErrorMsg", "error": "?"})
            self.rep.send(answer)

    def ask(self, step: str, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        """DEALER round trip; a request the controller drops is recorded as unanswered after the timeout."""
        sock.send_multipart(frames)
        try:
            reply = sock.recv_multipart()
        except zmq.Again:
            self.exchanges.append({"step": step, "sent": [f.hex() for f in frames], "reply": None})
            print(f"{step}: no reply within {RECV_TIMEOUT_MS} ms")
            return
        try:
            decoded: Any = msgspec.msgpack.decode(reply[-1])
        except msgspec.DecodeError:
            decoded = reply[-1].hex()
        self.exchanges.append(
            {"step": step, "reply_frames": len(reply), "reply": decoded, "reply_hex": reply[-1].hex()}
        )
        print(f"{step}: {len(reply)} frames, {json.dumps(decoded)}")

    def request(self, step: str, sock: zmq.Socket[bytes], message: dict[str, Any]) -> None:
        self.ask(step, sock, [b"", msgspec.msgpack.encode(message)])

    def send(self, step: str, *messages: dict[str, Any]) -> None:
        self.push.send_multipart([msgspec.msgpack.encode(m) for m in messages])
        self.exchanges.append({"step": step, "pushed": list(messages)})

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for sock in (self.push, self.dealer, self.heartbeat, self.rep):
            sock.close(linger=0)
        self.context.term()


def identity(worker_id: int, port: int, instance_id: str = INSTANCE) -> dict[str, Any]:
    return {"instance_id": instance_id, "worker_id": worker_id, "ip": "127.0.0.1", "port": port, "peer_init_url": None}


def http(worker: FakeWorker, step: str, path: str, body: dict[str, Any]) -> None:
    try:
        response = httpx.post(f"{worker.controller.url}{path}", json=body, timeout=10)
    except httpx.TimeoutException:
        worker.exchanges.append(
            {"step": step, "http": path, "body": body, "status": None, "answer": "no answer in 10 s"}
        )
        print(f"{step}: HTTP no answer within 10 s")
        return
    worker.exchanges.append(
        {"step": step, "http": path, "body": body, "status": response.status_code, "answer": response.json()}
    )
    print(f"{step}: HTTP {response.status_code} {response.text[:200]}")


def registration_and_sync(worker: FakeWorker) -> None:
    me = identity(0, worker.rep_port)
    cpu = {"instance_id": INSTANCE, "worker_id": 0, "location": "LocalCPUBackend"}
    worker.request("register", worker.dealer, {"type": "RegisterMsg", **me})
    ops = [{"op_type": "admit", "key": k, "seq_num": i} for i, k in enumerate([SEED_HASH, *RANGE_HASHES])]
    worker.send("admit 4 chunks", {"type": "BatchedKVOperationMsg", **cpu, "operations": ops})
    time.sleep(0.5)
    http(worker, "lookup after admits", "/lookup", {"tokens": SEED_PROMPT})
    worker.send(
        "evict with a seq gap",
        {"type": "BatchedKVOperationMsg", **cpu, "operations": [{"op_type": "evict", "key": SEED_HASH, "seq_num": 9}]},
    )
    worker.request("heartbeat (fresh controller)", worker.heartbeat, {"type": "HeartbeatMsg", **me})
    sync = {**cpu, "sync_id": "sync-1"}
    worker.request(
        "full sync start", worker.dealer, {"type": "FullSyncStartMsg", **sync, "total_keys": 4, "batch_count": 2}
    )
    worker.request(
        "full sync status before batches",
        worker.dealer,
        {"type": "FullSyncStatusMsg", "instance_id": INSTANCE, "worker_id": 0, "sync_id": "sync-1"},
    )
    worker.send(
        "full sync batch 1 of 2, then end",
        {"type": "FullSyncBatchMsg", **sync, "batch_id": 1, "keys": RANGE_HASHES[1:]},
        {"type": "FullSyncEndMsg", **sync, "actual_total_keys": 4},
    )
    time.sleep(0.5)
    worker.request(
        "full sync status, batch 0 missing",
        worker.dealer,
        {"type": "FullSyncStatusMsg", "instance_id": INSTANCE, "worker_id": 0, "sync_id": "sync-1"},
    )
    worker.send(
        "full sync batch 0 resent",
        {"type": "FullSyncBatchMsg", **sync, "batch_id": 0, "keys": [SEED_HASH, RANGE_HASHES[0]]},
    )
    time.sleep(0.5)
    worker.request(
        "full sync status after resend",
        worker.dealer,
        {"type": "FullSyncStatusMsg", "instance_id": INSTANCE, "worker_id": 0, "sync_id": "sync-1"},
    )
    worker.request("heartbeat after sync", worker.heartbeat, {"type": "HeartbeatMsg", **me})
    http(worker, "lookup after sync", "/lookup", {"tokens": SEED_PROMPT})
    worker.request(
        "p2p lookup",
        worker.dealer,
        {"type": "BatchedP2PLookupMsg", "hashes": [SEED_HASH, *RANGE_HASHES], "instance_id": "other", "worker_id": 0},
    )
    # Another instance: the controller registers this worker on the spot, and a command to an instance with a
    # worker that never answers would hang (0.5.6 has no timeout on its REQ round trips).
    ghost = identity(5, harness.free_port(), "ghost_inst")
    worker.request("heartbeat of an unknown worker", worker.heartbeat, {"type": "HeartbeatMsg", **ghost})


def bad_frames(worker: FakeWorker) -> None:
    me = identity(0, worker.rep_port)
    worker.ask("undecodable payload on reply", worker.dealer, [b"", b"\xc1garbage"])
    worker.ask(
        "payload without the empty frame", worker.dealer, [msgspec.msgpack.encode({"type": "HeartbeatMsg", **me})]
    )
    worker.ask(
        "JSON payload on heartbeat", worker.heartbeat, [b"", json.dumps({"type": "HeartbeatMsg", **me}).encode()]
    )
    worker.request(
        "control message on reply",
        worker.dealer,
        {"type": "ClearWorkerMsg", "worker_event_id": "x", "location": "LocalCPUBackend"},
    )
    worker.request("register on heartbeat", worker.heartbeat, {"type": "RegisterMsg", **me})


def commands(worker: FakeWorker) -> None:
    """HTTP commands the controller turns into REQ round trips to the worker's REP socket, answered as scripted."""

    def answer(message: dict[str, Any]) -> None:
        worker.answers.append(msgspec.msgpack.encode(message))

    cpu = {"instance_id": INSTANCE, "location": "LocalCPUBackend"}
    answer({"type": "ClearWorkerRetMsg", "num_tokens": 612})
    http(worker, "clear", "/clear", cpu)
    answer({"type": "HealthWorkerRetMsg", "error_code": 0})
    http(worker, "health", "/health", {"instance_id": INSTANCE, "worker_ids": None})
    answer({"type": "ErrorMsg", "error": "boom"})
    http(worker, "health, worker answers ErrorMsg", "/health", {"instance_id": INSTANCE})
    worker.answers.append(b"\xc1")
    http(worker, "health, worker answers garbage", "/health", {"instance_id": INSTANCE})
    answer({"type": "ErrorMsg", "error": "boom"})
    http(worker, "clear, worker answers ErrorMsg", "/clear", cpu)
    answer({"type": "PinWorkerRetMsg", "num_tokens": 12})
    http(worker, "pin", "/pin", {**cpu, "tokens": SEED_PROMPT})
    answer({"type": "CompressWorkerRetMsg", "num_tokens": 0})
    http(worker, "compress", "/compress", {**cpu, "method": "cachegen"})
    answer({"type": "DecompressWorkerRetMsg", "num_tokens": 0})
    http(worker, "decompress", "/decompress", {**cpu, "method": "cachegen", "tokens": None})


def main() -> None:
    harness.quiet_lmcache_logs()
    harness.require_lmcache_venv()
    with harness.running_controller() as controller:
        worker = FakeWorker(controller)
        try:
            registration_and_sync(worker)
            bad_frames(worker)
            commands(worker)
            worker.send(
                "deregister",
                {
                    "type": "DeRegisterMsg",
                    **{k: v for k, v in identity(0, worker.rep_port).items() if k != "peer_init_url"},
                },
            )
            time.sleep(0.5)
            response = httpx.get(f"{controller.url}/controller/workers?instance_id={INSTANCE}&worker_id=0", timeout=5)
            worker.exchanges.append(
                {"step": "worker 0 after deregister", "status": response.status_code, "answer": response.json()}
            )
            print(f"after deregister: {response.status_code} {response.text}")
        finally:
            worker.close()
    print("commands that reached the worker's REP socket:")
    for command in worker.commands:
        print(f"  {json.dumps(command['message'])}")
    if "--write" in sys.argv[1:]:
        harness.write_json(OUT, {"exchanges": worker.exchanges, "commands_received": worker.commands})
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
