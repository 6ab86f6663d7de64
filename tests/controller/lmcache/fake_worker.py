"""A stand-in for an LMCache 0.5.6 worker, speaking its protocol with pyzmq exactly as LMCacheWorker does:
DEALER to the reply socket, PUSH to the pull socket, DEALER to the heartbeat socket, and a REP socket
of its own that takes the controller's commands. Its answers are set by the test.

The real LMCacheWorker runs in the LMCache tier (tests/lmcache); this one runs anywhere, and can
also misbehave on purpose (answer errors, stay silent, skip sequence numbers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
import zmq

from kvbus.controller.lmcache import wire
from kvbus.shared.hashing import LMCacheHashSpace

Answer = Callable[[wire.ToWorker], msgspec.Struct | None]  # None: stay silent


@dataclass
class FakeLMCacheWorker:
    instance_id: str
    worker_id: int
    pull_port: int
    reply_port: int
    rep_port: int
    heartbeat_port: int | None = None
    space: LMCacheHashSpace = field(default_factory=LMCacheHashSpace)
    location: str = "LocalCPUBackend"
    answer: Answer | None = None
    received: list[wire.ToWorker] = field(default_factory=list)
    held: list[int] = field(default_factory=list)  # chunk hashes, in admission order
    tokens_held: int = 0

    def __post_init__(self) -> None:
        self._context = zmq.Context()
        self._push = self._context.socket(zmq.PUSH)
        self._push.connect(f"tcp://127.0.0.1:{self.pull_port}")
        self._dealer = self._dealer_to(self.reply_port)
        self._heartbeat = self._dealer_to(self.heartbeat_port) if self.heartbeat_port is not None else None
        self._rep = self._context.socket(zmq.REP)
        self._rep.bind(f"tcp://127.0.0.1:{self.rep_port}")
        self._seq = 0
        self._lock = threading.Lock()  # the serving thread reports a clear's evictions on a socket of its own
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _dealer_to(self, port: int) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        return sock

    def register(self) -> wire.RegisterRetMsg:
        message = wire.RegisterMsg(
            instance_id=self.instance_id, worker_id=self.worker_id, ip="127.0.0.1", port=self.rep_port
        )
        answer = self._ask(self._dealer, message)
        assert isinstance(answer, wire.RegisterRetMsg), answer
        return answer

    def heartbeat(self) -> wire.HeartbeatRetMsg:
        assert self._heartbeat is not None
        message = wire.HeartbeatMsg(
            instance_id=self.instance_id, worker_id=self.worker_id, ip="127.0.0.1", port=self.rep_port
        )
        answer = self._ask(self._heartbeat, message)
        assert isinstance(answer, wire.HeartbeatRetMsg), answer
        return answer

    def ask(self, message: msgspec.Struct) -> msgspec.Struct:
        """A message on the reply socket (full-sync start and status), and the controller's answer."""
        return self._ask(self._dealer, message)

    @staticmethod
    def _ask(sock: zmq.Socket[bytes], message: msgspec.Struct) -> msgspec.Struct:
        # LMCache's DEALER sends an empty delimiter, then the payload, and reads the payload as the last frame.
        sock.send_multipart([b"", wire.encode(message)])
        return msgspec.msgpack.decode(sock.recv_multipart()[-1], type=_CONTROLLER_ANSWER)

    def store(self, tokens: Sequence[int], *, skip_seq: int = 0) -> None:
        """Admit every chunk of `tokens` the way LMCache reports a store: one batch, numbered ops."""
        hashes = [int(chunk.key) for chunk in self.space.chunks(tokens)]
        self._seq += skip_seq
        self.push_ops([(wire.OpType.ADMIT, h) for h in hashes if h not in self.held])
        self.held += [h for h in hashes if h not in self.held]
        self.tokens_held = max(self.tokens_held, len(tokens))

    def push_ops(self, ops: Sequence[tuple[wire.OpType, int]], sock: zmq.Socket[bytes] | None = None) -> None:
        with self._lock:
            events = []
            for op_type, key in ops:
                events.append(wire.KVOpEvent(op_type=op_type, key=key, seq_num=self._seq))
                self._seq += 1
            batch = wire.BatchedKVOperationMsg(
                instance_id=self.instance_id, worker_id=self.worker_id, location=self.location, operations=events
            )
            (sock or self._push).send_multipart([wire.encode(batch)])

    def push(self, *messages: msgspec.Struct) -> None:
        self._push.send_multipart([wire.encode(m) for m in messages])

    def deregister(self) -> None:
        self.push(
            wire.DeRegisterMsg(
                instance_id=self.instance_id, worker_id=self.worker_id, ip="127.0.0.1", port=self.rep_port
            )
        )

    def _serve(self) -> None:
        reports = self._context.socket(zmq.PUSH)
        reports.connect(f"tcp://127.0.0.1:{self.pull_port}")
        poller = zmq.Poller()
        poller.register(self._rep, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            message = msgspec.msgpack.decode(self._rep.recv(), type=wire.ToWorker)
            self.received.append(message)
            evicted = list(self.held) if isinstance(message, wire.ClearWorkerMsg) else []
            answer = (self.answer or self._default)(message)
            if answer is None:
                continue  # silent: a REP socket that never answers takes nothing more, as a hung worker
            self._rep.send(wire.encode(answer))
            if evicted and not self.held:
                # As LMCache does: the clear's evictions go to the controller after the answer, batched.
                self.push_ops([(wire.OpType.EVICT, key) for key in evicted], reports)
        reports.close(linger=0)

    def _default(self, message: wire.ToWorker) -> msgspec.Struct:
        """An obliging worker: a clear frees what it holds and reports the evictions, as LMCache does."""
        if isinstance(message, wire.ClearWorkerMsg):
            freed, self.held, self.tokens_held = self.tokens_held, [], 0
            return wire.ClearWorkerRetMsg(num_tokens=freed)
        if isinstance(message, wire.HealthWorkerMsg):
            return wire.HealthWorkerRetMsg(error_code=0)
        if isinstance(message, wire.PinWorkerMsg):
            return wire.PinWorkerRetMsg(num_tokens=len(message.tokens))
        if isinstance(message, wire.CompressWorkerMsg | wire.DecompressWorkerMsg):
            return wire.CompressWorkerRetMsg(num_tokens=len(message.tokens or []))
        return wire.ErrorMsg(error=f"unsupported {type(message).__name__}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._context.destroy(linger=0)


_CONTROLLER_ANSWER = (
    wire.RegisterRetMsg
    | wire.HeartbeatRetMsg
    | wire.FullSyncStartRetMsg
    | wire.FullSyncStatusRetMsg
    | wire.BatchedP2PLookupRetMsg
)
