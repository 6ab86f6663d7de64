"""The sockets LMCache workers report to, bound on the monitor ports: PULL, ROUTER reply, ROUTER heartbeat.

`--monitor-ports '{"pull": P1, "reply": P2, "heartbeat": P3}'` (LMCache 0.5.6's flag, also the
yaml's `controller_monitor_ports`) binds each; `--monitor-port P` (the flag the seed uses) binds
pull on P, reply on P+1 and heartbeat on P+2. Every frame is decoded as LMCache encodes it; one
that is not a message of its socket is logged and skipped, and the loop goes on (a stray HTTP probe
must not stop the index from being kept, as it does LMCache 0.5.6's). ROUTER frames are read as
LMCache's main branch reads them: the payload is the last frame, after the identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import redis
import zmq
import zmq.asyncio

from kvbus.controller.lmcache import wire
from kvbus.controller.lmcache.workers import LMCacheWorkers

log = logging.getLogger("kvbus.controller.lmcache")

# Frames (reports) taken off the pull socket for one Redis round trip, at most.
_PULL_BURST = 2000


class MonitorPorts(msgspec.Struct, forbid_unknown_fields=True):
    pull: int
    reply: int
    heartbeat: int | None = None

    @classmethod
    def of_port(cls, port: int) -> MonitorPorts:
        """The seed's `--monitor-port P`: pull on P, then reply and heartbeat on the next two ports."""
        return cls(pull=port, reply=port + 1, heartbeat=port + 2)


@dataclass
class Monitor:
    workers: LMCacheWorkers
    host: str
    ports: MonitorPorts

    def __post_init__(self) -> None:
        self._context = zmq.asyncio.Context()
        self._sockets: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.received = {"pull": 0, "reply": 0, "heartbeat": 0}  # messages, per socket, since start

    def bind(self) -> None:
        """Bind every socket now, so a taken port fails the controller's start with its name.

        On a failure every socket made so far is closed and the context ended: ZMQ's own threads
        would otherwise keep a controller that failed to start alive.
        """
        try:
            pull = self._bind(zmq.PULL, self.ports.pull, "pull")
            reply = self._bind(zmq.ROUTER, self.ports.reply, "reply")
            heartbeat = (
                self._bind(zmq.ROUTER, self.ports.heartbeat, "heartbeat") if self.ports.heartbeat is not None else None
            )
        except OSError:
            self._close()
            raise
        self._tasks = [
            asyncio.create_task(self._serve_pull(pull), name="lmcache-pull"),
            asyncio.create_task(self._serve_router(reply, self._on_reply, "reply"), name="lmcache-reply"),
        ]
        if heartbeat is not None:
            self._tasks.append(
                asyncio.create_task(self._serve_router(heartbeat, self._on_heartbeat, "heartbeat"), name="lmcache-hb")
            )
        log.info("LMCache worker protocol on %s: %s", self.host, msgspec.json.encode(self.ports).decode())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close()

    def _close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets = []
        self._context.term()

    def _bind(self, kind: int, port: int, name: str) -> zmq.asyncio.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(f"tcp://{self.host}:{port}")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise OSError(f"cannot bind LMCache's {name} socket on {self.host}:{port}: {exc}") from None
        self._sockets.append(sock)
        return sock

    async def _serve_pull(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            # LMCache sends up to 50 queued messages as the frames of one multipart message, and many
            # workers send at once: everything already queued goes to Redis together, in one round trip.
            frames = await sock.recv_multipart()
            with contextlib.suppress(zmq.Again):
                while len(frames) < _PULL_BURST:
                    frames += await sock.recv_multipart(zmq.NOBLOCK)
            self.received["pull"] += len(frames)
            batches: list[wire.BatchedKVOperationMsg] = []
            for frame in frames:
                message = await self._guarded("pull", self._decode_pull, frame)
                if isinstance(message, wire.BatchedKVOperationMsg):
                    batches.append(message)
                elif message is not None:
                    # Reports before it happened before it: they go first.
                    await self._guarded("pull", self.workers.apply, batches)
                    batches = []
                    await self._guarded("pull", self._on_pull, message)
            await self._guarded("pull", self.workers.apply, batches)

    async def _serve_router(
        self, sock: zmq.asyncio.Socket, handle: Callable[[bytes], Awaitable[msgspec.Struct]], name: str
    ) -> None:
        while True:
            frames = await sock.recv_multipart()
            self.received[name] += 1
            if len(frames) < 2:
                log.warning("LMCache %s socket: a message of %d frame(s) has no payload; skipped", name, len(frames))
                continue
            answer = await self._guarded(name, handle, frames[-1])
            if answer is not None:
                await sock.send_multipart([frames[0], b"", wire.encode(answer)])

    async def _guarded(self, name: str, handle: Callable[[Any], Awaitable[Any]], payload: Any) -> Any:
        """One message's handling: a bad frame or a Redis outage costs that message, never the loop."""
        try:
            return await handle(payload)
        except wire.WireError as exc:
            log.warning("LMCache %s socket: skipped a frame that is not an LMCache message (%s)", name, exc)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("LMCache %s socket: Redis unreachable, a message was lost (%s)", name, exc)
        except redis.ResponseError as exc:
            log.error("LMCache %s socket: Redis refused a write (%s)", name, exc)
        return None

    @staticmethod
    async def _decode_pull(payload: bytes) -> wire.FromWorkerPull:
        return wire.decode_pull_socket(payload)

    async def _on_pull(self, message: wire.FromWorkerPull) -> None:
        if isinstance(message, wire.DeRegisterMsg):
            await self.workers.deregister(message)
        elif isinstance(message, wire.FullSyncBatchMsg):
            await self.workers.sync_batch(message)
        elif isinstance(message, wire.FullSyncEndMsg):
            await self.workers.end_sync(message)

    async def _on_reply(self, payload: bytes) -> msgspec.Struct:
        message = wire.decode_reply_socket(payload)
        if isinstance(message, wire.RegisterMsg):
            return await self.workers.register(message)
        if isinstance(message, wire.FullSyncStartMsg):
            return await self.workers.start_sync(message)
        if isinstance(message, wire.FullSyncStatusMsg):
            return await self.workers.sync_status(message)
        # LMCache's own P2P lookup between workers; kvbus moves chunks through /move instead.
        return wire.BatchedP2PLookupRetMsg(layout_info=[("", "", 0, "")])

    async def _on_heartbeat(self, payload: bytes) -> msgspec.Struct:
        return await self.workers.heartbeat(wire.decode_heartbeat_socket(payload))
