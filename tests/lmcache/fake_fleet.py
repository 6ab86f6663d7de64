"""Many LMCache 0.5.6 workers' side of the controller protocol from one process, for fleets too large for real
engines (1000 LMCacheEngines would not fit) or for FakeLMCacheWorker's thread and context per worker.

Everything goes over real ZMQ sockets to the controller's monitor ports, framed as LMCacheWorker frames it:

- `register`: one DEALER per worker, every RegisterMsg sent before any answer is read (a fleet starting at once),
  `[b"", payload]` as LMCache's DEALER sends it.
- `admit_frames` / `Pushers`: BatchedKVOperationMsg frames of numbered admit ops (seq_num from 0 per worker
  and location, as LMCache's BatchedMessageSender numbers them), sent on one PUSH socket per worker.
- `AnswerPool`: the workers' REP side. A real worker binds a REP socket of its own; here a few ROUTER sockets
  answer for the whole fleet (worker i registers the port of socket i % len(pool)), which to the controller's
  DEALER is the same exchange, `[b"", request]` in, `[b"", answer]` out. Clears are answered with a set token
  count and report no evictions; health with 0.

`python -m tests.lmcache.fake_fleet answer N` runs an AnswerPool of N sockets in a process of its own (so that
answering does not share the caller's GIL), prints its ports as one JSON line and answers until stdin closes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec
import zmq

from kvbus.controller.lmcache import wire

CPU = "LocalCPUBackend"
_MAX_SOCKETS = 8192  # libzmq's default, 1023 per context, is short of a fleet's DEALER and PUSH sockets
LMCACHE_BATCH = 50  # ops per BatchedKVOperationMsg at LMCache's flush threshold (kv_msg_batch_size)


_shared: zmq.Context[zmq.Socket[bytes]] | None = None


def _context() -> zmq.Context[zmq.Socket[bytes]]:
    """This process's context for fleets, allowed more sockets than libzmq's default (set before any is made)."""
    global _shared
    if _shared is None:
        _shared = zmq.Context()
        _shared.set(zmq.MAX_SOCKETS, _MAX_SOCKETS)
    return _shared


@dataclass(frozen=True)
class Worker:
    instance_id: str
    worker_id: int
    rep_port: int


def register(reply_port: int, workers: Sequence[Worker], timeout_s: float = 60.0) -> float:
    """Register every worker at once, each from a DEALER of its own; returns the seconds until the last answer.

    Raises TimeoutError if any answer is missing after `timeout_s`, RuntimeError if any is not a RegisterRetMsg."""
    context = _context()
    sockets = []
    try:
        for _ in workers:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{reply_port}")
            sockets.append(sock)
        started = time.perf_counter()
        for sock, worker in zip(sockets, workers, strict=True):
            message = wire.RegisterMsg(
                instance_id=worker.instance_id, worker_id=worker.worker_id, ip="127.0.0.1", port=worker.rep_port
            )
            sock.send_multipart([b"", wire.encode(message)])
        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        waiting, deadline = set(sockets), time.monotonic() + timeout_s
        while waiting:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise TimeoutError(f"{len(waiting)} of {len(workers)} registrations unanswered after {timeout_s} s")
            for sock, _ in poller.poll(left_ms):
                answer = msgspec.msgpack.decode(sock.recv_multipart()[-1], type=wire.RegisterRetMsg | wire.ErrorMsg)
                if not isinstance(answer, wire.RegisterRetMsg):
                    raise RuntimeError(f"registration refused: {answer}")
                poller.unregister(sock)
                waiting.discard(sock)
        return time.perf_counter() - started
    finally:
        for sock in sockets:
            sock.close(linger=0)


def admit_frames(
    worker: Worker, chunk_hashes: Sequence[int], *, batch: int = LMCACHE_BATCH, first_seq: int = 0
) -> list[bytes]:
    """Encoded BatchedKVOperationMsg frames admitting `chunk_hashes` at LocalCPUBackend, `batch` ops each,
    numbered on from `first_seq`."""
    frames = []
    for start in range(0, len(chunk_hashes), batch):
        ops = [
            wire.KVOpEvent(op_type=wire.OpType.ADMIT, key=key, seq_num=first_seq + start + n)
            for n, key in enumerate(chunk_hashes[start : start + batch])
        ]
        message = wire.BatchedKVOperationMsg(
            instance_id=worker.instance_id, worker_id=worker.worker_id, location=CPU, operations=ops
        )
        frames.append(wire.encode(message))
    return frames


class Pushers:
    """One PUSH socket per worker to the controller's pull socket, as each LMCacheWorker has its own."""

    def __init__(self, pull_port: int, count: int) -> None:
        context = _context()
        self.sockets = []
        for _ in range(count):
            sock = context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{pull_port}")
            self.sockets.append(sock)

    def send(self, multiparts: Iterable[tuple[int, Sequence[bytes]]]) -> None:
        """Send each (socket number, frames) as one multipart message, in order (blocking at the high-water
        mark, so nothing is dropped)."""
        sockets = self.sockets
        for number, frames in multiparts:
            sockets[number].send_multipart(frames, copy=False)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)


_TO_WORKER = msgspec.msgpack.Decoder(wire.ToWorker)


def _answer(request: bytes, clear_tokens: int) -> msgspec.Struct:
    try:
        message = _TO_WORKER.decode(request)
    except msgspec.DecodeError as exc:
        return wire.ErrorMsg(error=f"MessagePack data is malformed: {exc}")
    if isinstance(message, wire.ClearWorkerMsg):
        return wire.ClearWorkerRetMsg(num_tokens=clear_tokens)
    if isinstance(message, wire.HealthWorkerMsg):
        return wire.HealthWorkerRetMsg(error_code=0)
    return wire.ErrorMsg(error=f"the fake fleet does not serve {type(message).__name__}")


@dataclass
class AnswerPool:
    """`size` ROUTER sockets on free loopback ports answering the controller's commands for a whole fleet."""

    size: int = 4
    clear_tokens: int = 0
    ports: list[int] = field(default_factory=list)
    requests: int = 0

    def start(self) -> AnswerPool:
        self._context = zmq.Context()
        self._sockets = []
        for _ in range(self.size):
            sock = self._context.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            self.ports.append(sock.bind_to_random_port("tcp://127.0.0.1"))
            self._sockets.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-fleet-answers", daemon=True)
        self._thread.start()
        return self

    def port_of(self, number: int) -> int:
        """The REP port worker `number` of the fleet registers."""
        return self.ports[number % len(self.ports)]

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in self._sockets:
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(50):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.requests += 1
                    # [identity, b"", request] from the controller's DEALER, as a REP socket would see it.
                    sock.send_multipart([frames[0], b"", wire.encode(_answer(frames[-1], self.clear_tokens))])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._context.destroy(linger=0)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "answer":
        sys.exit("usage: python -m tests.lmcache.fake_fleet answer SOCKETS [CLEAR_TOKENS]")
    pool = AnswerPool(int(argv[1]), int(argv[2]) if len(argv) > 2 else 0).start()
    print(json.dumps({"ports": pool.ports}), flush=True)
    try:
        sys.stdin.read()  # until the caller closes our stdin (or dies)
    finally:
        pool.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
