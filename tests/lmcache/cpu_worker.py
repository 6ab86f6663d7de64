"""A real LMCache 0.5.6 engine and its LMCacheWorker on a CPU-only machine, driven by a stand-in controller
that knows nothing of lmcache: plain pyzmq sockets and msgpack maps, as kvbus will have to be.

Run: .venv-lmcache/bin/python tests/lmcache/cpu_worker.py [--write]
The engine (harness.build_engine: LocalCPUBackend, LMCache's mock GPU connector) registers, pushes admit
batches for what it stores, heartbeats, answers health/pin/clear/check_finish/compress on its REP socket,
pushes evicts for what the clear removed, and deregisters on close. Every frame the stand-in receives is
printed; `--write` saves them, with their bytes, to tests/lmcache/worker_transcript.json.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness

TRANSCRIPT = Path(__file__).with_name("worker_transcript.json")
SEED_PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
RANGE_PROMPT = list(range(1000, 1600))
WAIT_S = 30.0
COMMAND_TIMEOUT_MS = 30_000


@dataclass
class Frame:
    socket: str  # pull, reply or heartbeat
    frames: int  # ZMQ frames in the multipart message, identity included for ROUTER
    payload: bytes

    def decoded(self) -> Any:
        import msgspec

        return msgspec.msgpack.decode(self.payload)


@dataclass
class StandIn:
    """The controller's three bound sockets, answering registrations and heartbeats with bare msgpack maps."""

    pull: int = field(default_factory=harness.free_port)
    reply: int = field(default_factory=harness.free_port)
    heartbeat: int = field(default_factory=harness.free_port)
    received: list[Frame] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        import zmq

        self.context = zmq.Context()
        self.sockets = {
            "pull": self._bind(zmq.PULL, self.pull),
            "reply": self._bind(zmq.ROUTER, self.reply),
            "heartbeat": self._bind(zmq.ROUTER, self.heartbeat),
        }
        self.thread = threading.Thread(target=self._serve, name="stand-in-controller", daemon=True)
        self.thread.start()

    def _bind(self, kind: int, port: int) -> Any:
        sock = self.context.socket(kind)
        sock.bind(f"tcp://127.0.0.1:{port}")
        return sock

    def _serve(self) -> None:
        import msgspec
        import zmq

        poller = zmq.Poller()
        for sock in self.sockets.values():
            poller.register(sock, zmq.POLLIN)
        names = {sock: name for name, sock in self.sockets.items()}
        while not self.stopping.is_set():
            for sock, _ in poller.poll(50):
                parts = sock.recv_multipart()
                name = names[sock]
                # PULL: every frame is one message (a worker sends up to 50 per multipart).
                # ROUTER: [identity, b"", payload] from the worker's DEALER.
                payloads = parts if name == "pull" else [parts[-1]]
                with self.lock:
                    self.received += [Frame(name, len(parts), p) for p in payloads]
                if name != "pull":
                    answer = self._answer(msgspec.msgpack.decode(parts[-1]))
                    sock.send_multipart([parts[0], b"", msgspec.msgpack.encode(answer)])

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["type"] == "RegisterMsg":
            # Without a heartbeat_url the worker never heartbeats.
            return {"type": "RegisterRetMsg", "extra_config": {"heartbeat_url": f"127.0.0.1:{self.heartbeat}"}}
        if request["type"] == "HeartbeatMsg":
            return {"type": "HeartbeatRetMsg", "commands": []}
        return {"type": "ErrorMsg", "error": f"stand-in does not serve {request['type']}"}

    def messages(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            frames = list(self.received)
        return [m for m in (f.decoded() for f in frames) if m["type"] == kind]

    def operations(self, op_type: str) -> list[dict[str, Any]]:
        ops = [op for batch in self.messages("BatchedKVOperationMsg") for op in batch["operations"]]
        return [op for op in ops if op["op_type"] == op_type]

    def command(self, port: int, request: dict[str, Any]) -> dict[str, Any]:
        """What LMCache's executor does: one REQ round trip to the worker's REP socket (with a timeout here)."""
        import msgspec
        import zmq

        sock = self.context.socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, COMMAND_TIMEOUT_MS)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        try:
            sock.send(msgspec.msgpack.encode(request))
            answer: dict[str, Any] = msgspec.msgpack.decode(sock.recv())
            return answer
        finally:
            sock.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.context.term()


def run(stand_in: StandIn) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Drive one engine through its life; returns (what, command, answer) for each REQ round trip.

    The range prompt is stored again after the clear, so that the compresses have chunks to work on."""
    spec = harness.WorkerSpec("cpu-probe", 0, 1, [harness.free_port()], heartbeat_s=1.0)
    engine = harness.build_engine(spec, f"127.0.0.1:{stand_in.pull}", f"127.0.0.1:{stand_in.reply}")
    port = spec.worker_ports[0]
    location = "LocalCPUBackend"
    harness.wait_for(lambda: stand_in.messages("RegisterMsg"), WAIT_S, "RegisterMsg")
    harness.store(engine, SEED_PROMPT)
    harness.store(engine, RANGE_PROMPT)
    harness.wait_for(lambda: len(stand_in.operations("admit")) >= 4, WAIT_S, "4 admits")
    commands: list[tuple[str, dict[str, Any]]] = [
        ("health", {"type": "HealthWorkerMsg", "worker_event_id": "HealthWorker0probe"}),
        (
            "pin",
            {"type": "PinWorkerMsg", "worker_event_id": "Worker0Pinprobe", "location": location, "tokens": SEED_PROMPT},
        ),
        ("clear", {"type": "ClearWorkerMsg", "worker_event_id": "Worker0Clearprobe", "location": location}),
        (
            "clear unknown location",
            {"type": "ClearWorkerMsg", "worker_event_id": "Worker0Clearprobe2", "location": "NoSuchBackend"},
        ),
        ("check_finish", {"type": "CheckFinishWorkerMsg", "worker_event_id": "Worker0probe"}),
    ]
    answers = [(what, request, stand_in.command(port, request)) for what, request in commands]
    harness.wait_for(lambda: stand_in.operations("evict"), WAIT_S, "evicts after the clear")
    harness.wait_for(lambda: stand_in.messages("HeartbeatMsg"), WAIT_S, "a heartbeat")
    harness.store(engine, RANGE_PROMPT)  # again, so that the compresses have chunks to work on
    harness.wait_for(lambda: len(stand_in.operations("admit")) >= 7, WAIT_S, "3 more admits")
    compresses: list[tuple[str, dict[str, Any]]] = [
        (
            "compress cachegen, no tokens",
            {
                "type": "CompressWorkerMsg",
                "worker_event_id": "CompressWorker0a",
                "method": "cachegen",
                "location": location,
                "tokens": [],
            },
        ),
        (
            "compress cachegen, range prompt",
            {
                "type": "CompressWorkerMsg",
                "worker_event_id": "CompressWorker0b",
                "method": "cachegen",
                "location": location,
                "tokens": RANGE_PROMPT,
            },
        ),
        (
            "compress zlib, range prompt",
            {
                "type": "CompressWorkerMsg",
                "worker_event_id": "CompressWorker0c",
                "method": "zlib",
                "location": location,
                "tokens": RANGE_PROMPT,
            },
        ),
    ]
    answers += [(what, request, stand_in.command(port, request)) for what, request in compresses]
    # A compress replaces each chunk (remove, then put): 3 more evicts and 3 more admits, to be flushed before
    # close, which stops the worker's loop before the sender's last batch.
    harness.wait_for(lambda: len(stand_in.operations("evict")) >= 6, WAIT_S, "the compress's evicts")
    harness.wait_for(lambda: len(stand_in.operations("admit")) >= 10, WAIT_S, "the compress's admits")
    harness.close_engine(engine, spec)
    try:
        # 0.5.6's close() queues DeRegisterMsg and stops the worker's event loop in the same breath.
        harness.wait_for(lambda: stand_in.messages("DeRegisterMsg"), 3.0, "DeRegisterMsg")
    except TimeoutError as missing:
        print(f"note: {missing}: LMCacheWorker.close() did not deliver it")
    return answers


def main() -> None:
    harness.quiet_lmcache_logs()
    harness.require_lmcache_venv()
    stand_in = StandIn()
    stand_in.start()
    try:
        answers = run(stand_in)
    finally:
        stand_in.stop()
    print("worker -> controller (socket, frames, message):")
    for frame in stand_in.received:
        print(f"  {frame.socket:9} {frame.frames}  {json.dumps(frame.decoded())}")
    print("controller -> worker REP (command: answer):")
    for what, _, answer in answers:
        print(f"  {what}: {json.dumps(answer)}")
    if "--write" in sys.argv[1:]:
        document = {
            "received": [
                {"socket": f.socket, "frames": f.frames, "message": f.decoded(), "msgpack_hex": f.payload.hex()}
                for f in stand_in.received
            ],
            "commands": [{"what": w, "request": r, "answer": a} for w, r, a in answers],
        }
        harness.write_json(TRANSCRIPT, document)
        print(f"wrote {TRANSCRIPT}")


if __name__ == "__main__":
    main()
