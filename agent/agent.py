"""The agent: backends and their tiers, index writer, registration and command consumer, started and stopped together.

It lives inside someone else's process, so it only runs plain daemon threads (one for the
command stream, one for heartbeats, one for index writes, one that frees what clears detached),
never touches the host's event loop, and installs no signal handlers: the host calls `stop()`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import redis

from kvbus.agent.backends import StorageBackend, make_backends
from kvbus.agent.consumer import CommandConsumer
from kvbus.agent.handlers import CommandHandlers
from kvbus.agent.index_writer import IndexWriter
from kvbus.agent.peer import PeerServer
from kvbus.agent.registration import Registration, WorkerAddress
from kvbus.agent.tiers import TieredStore
from kvbus.agent.working_signs import WorkingSigns
from kvbus.shared import keys, redis_conn
from kvbus.shared.config import KVBusConfig
from kvbus.shared.hashing import HashSpace
from kvbus.shared.outage import Outage
from kvbus.shared.records import LifecycleKind

log = logging.getLogger("kvbus.agent")

# How long after a clear's answer its chunks are freed: by then the answer has reached the controller,
# so freeing them (about 1 ms of CPU per 1000 chunks) does not compete with it for a small host's cores.
RELEASE_DELAY_S = 0.005


class Agent:
    def __init__(
        self,
        config: KVBusConfig,
        *,
        model: str,
        worker_id: int = 0,
        layout: str | None = None,
    ) -> None:
        self.config = config
        self.instance_id = config.lmcache_instance_id
        self.worker_id = worker_id
        self.space = HashSpace(model, config.chunk_size, config.save_unfull_chunk)
        self._redis = redis_conn.connect(config.redis_url)
        self._blocking = redis_conn.connect(config.redis_url, blocking=True)
        self.index = IndexWriter(self._redis, self.instance_id, worker_id)
        self.backends: list[StorageBackend] = make_backends(
            config, self.space, self.index, worker_id=worker_id, layout=layout or ""
        )
        self.tiers = TieredStore(self.space, self.backends)  # what the engine stores to and retrieves from
        self.registration = Registration(
            self._redis,
            instance_id=self.instance_id,
            worker_id=worker_id,
            space=self.space,
            locations=[b.location for b in self.backends],
            address=_address(config, worker_id),
            ttl_s=config.heartbeat_ttl,
            layout=layout,
            stats=lambda: {str(b.location): b.stats() for b in self.backends},
        )
        self.working = WorkingSigns(self._redis, worker_id)
        self.consumer = CommandConsumer(
            self._blocking,
            instance_id=self.instance_id,
            worker_id=worker_id,
            handler=CommandHandlers(
                {b.location: b for b in self.backends},
                self.instance_id,
                worker_id,
                space=self.space,
                transfer_timeout_s=config.command_timeout,
            ),
            before_reply=self.index.flush,
            index=self.index,
            now_ms=self.registration.now_ms,
            after_reply=self._after_reply,
            running=self.working.running,
            event_retention_s=config.event_retention,
        )
        self.peer: PeerServer | None = None
        self._stop = threading.Event()
        # Held until stop(): where the heartbeat cannot wait in Redis (`_next_wait`), the thread sleeps by acquiring
        # this with a timeout, one call into C, where Event.wait runs a Condition's Python code, which an idle
        # engine pays for every second on cold caches.
        self._beating = threading.Lock()
        self._beating.acquire()
        # After a quiet beat (Registration.quiet: no command, nothing stored or dropped) the next comes a third of
        # the TTL later where that is longer: such a beat only keeps the instance alive, which two more beats
        # within the TTL still do, and an idle engine pays about 0.5 ms of CPU for each beat's wake-up.
        self._quiet_interval = max(config.heartbeat_interval, config.heartbeat_ttl / 3)
        self._detached = threading.Event()  # set once an answer is out while a backend holds detached chunks
        self._reregistering = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Register, drop index entries a crashed predecessor left, and start serving commands."""
        self.registration.register()
        self._publish_all()  # replaces whatever a crashed predecessor left in the index
        self.consumer.ensure_group()
        self.consumer.rehearse()
        if self.peer is None:
            self.peer = self._listen_for_peers()
        self.index.start()
        self.tiers.start()
        self.working.start()
        for name, target in (
            ("heartbeat", self._heartbeat_loop),
            ("commands", self._command_loop),
            ("reclaim", self._reclaim_loop),
        ):
            thread = threading.Thread(target=target, name=f"kvbus-{name}-{self.instance_id}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "agent %s worker %d serving %s for model %s (chunk_size %d) via %s",
            self.instance_id,
            self.worker_id,
            ", ".join(b.location for b in self.backends) or "nothing",
            self.space.model,
            self.space.chunk_size,
            redis_conn.redacted(self.config.redis_url),
        )

    def start_when_reachable(self, stop: threading.Event, retry_s: float = 2.0) -> bool:
        """`start()`, retried while Redis is unreachable; False if `stop` was set first.

        Engines and compose start in any order, so an agent waits for Redis rather than dying.
        """
        outage = Outage(
            log, f"starting against Redis at {redis_conn.redacted(self.config.redis_url)}", backoff_s=retry_s
        )
        while not stop.is_set():
            try:
                self.start()
                outage.succeeded()
                return True
            except redis_conn.ERRORS as exc:
                stop.wait(outage.failed(exc))
        return False

    def stop(self) -> None:
        """Finish the command in hand, drop this rank's index entries, then deregister.

        The index goes first: while this rank is still registered, lookup credits the instance with
        nothing this rank no longer serves. The last worker also takes the instance away.
        """
        self._stop.set()
        if self._beating.locked():
            self._beating.release()
        if self._threads and self.registration.waits_in_redis(self.config.heartbeat_interval):
            with contextlib.suppress(*redis_conn.ERRORS):  # then the waiting beat fails by itself, and the thread ends
                self.registration.wake()
        self.consumer.interrupt()
        self._detached.set()  # wakes the reclaim thread, to end
        for thread in self._threads:
            thread.join(timeout=10)
        self.working.stop()
        if self.peer is not None:
            self.peer.stop()
        self.tiers.stop()
        self.index.stop()
        try:
            self.index.purge([b.location for b in self.backends])
            self.registration.deregister()
        except redis_conn.ERRORS as exc:
            log.warning(
                "could not deregister from Redis (%s); lookups skip the instance once its heartbeat "
                "lapses, and its next start replaces its index entries",
                exc,
            )
        log.info("agent %s worker %d stopped", self.instance_id, self.worker_id)

    def _listen_for_peers(self) -> PeerServer | None:
        """The endpoint other agents /move chunks into, where p2p_init_ports gives this worker a port."""
        url = self.registration.address.peer_init_url
        if url is None:
            return None
        host, _, port = url.rpartition(":")
        try:
            server = PeerServer(
                host,
                int(port),
                self.space,
                {b.location: b for b in self.backends},
                after_store=self.index.flush,
                timeout_s=self.config.command_timeout,
                tickets=self._redis,
                instance_id=self.instance_id,
                worker_id=self.worker_id,
            )
        except OSError as exc:
            log.error(
                "cannot listen for peer transfers on %s (%s): moves into this worker will fail; "
                "free the port or change p2p_init_ports",
                url,
                exc,
            )
            return None
        server.start()
        return server

    def _publish_all(self) -> None:
        for backend in self.backends:
            backend.publish_all()
        self.index.flush()

    def _after_reply(self) -> None:
        if any(backend.holds_detached() for backend in self.backends):
            self._detached.set()

    def _reclaim_loop(self) -> None:
        """Free what clears detached, a moment after their answers are out.

        Not on the command thread, which would make the next command wait behind it, nor on a thread
        started per clear, which takes the interpreter lock from the clear while it answers.
        """
        while not self._stop.is_set():
            self._detached.wait()
            self._detached.clear()
            time.sleep(RELEASE_DELAY_S)
            for backend in self.backends:
                backend.release_detached()

    def _heartbeat_loop(self) -> None:
        # Heartbeats keep their own cadence during an outage: the next one is the retry.
        outage = Outage(log, "heartbeat to Redis", backoff_s=self.config.heartbeat_interval)
        serving = redis_conn.serving_node(self._redis, keys.alive(self.instance_id))
        # Asked once: redis-py's clients are typing Protocols, whose isinstance runs Python code.
        cluster = isinstance(self._redis, redis.cluster.RedisCluster)
        while (wait_s := self._next_wait(outage.ongoing)) is not None:
            try:
                if not self.registration.heartbeat(wait_s):
                    self._reregister("Redis no longer knows this instance (restarted or flushed)")
                now_serving = redis_conn.serving_node(self._redis, keys.alive(self.instance_id)) if cluster else None
                if now_serving != serving:
                    # A replica that took over may lack the master's last writes (replication is asynchronous).
                    self._reregister(f"its slot moved from {serving} to {now_serving} (a failover or a resharding)")
                    serving = now_serving
                lost = self.index.take_resync_request()
                if lost:
                    self._reregister(f"index writes for {', '.join(lost)} were dropped while Redis was away")
            except redis_conn.ERRORS as exc:
                outage.failed(exc)
                continue
            outage.succeeded()

    def _next_wait(self, redis_away: bool) -> float | None:
        """How long the next heartbeat waits in Redis before it beats (Registration.heartbeat), None once the agent
        is stopping. Where it cannot wait there, and while Redis is away, so that a failing Redis never makes the
        thread spin, the thread sleeps out the interval first."""
        quiet = self.registration.quiet and not redis_away
        interval = self._quiet_interval if quiet else self.config.heartbeat_interval
        if not redis_away and self.registration.waits_in_redis(interval):
            return None if self._stop.is_set() else interval
        return None if self._beating.acquire(timeout=interval) else 0.0

    def _reregister(self, reason: str) -> None:
        with self._reregistering:
            self.registration.register()
            self.consumer.ensure_group()
            self._publish_all()
        held = sum(len(b) for b in self.backends)
        self.registration.lifecycle(LifecycleKind.RESYNCED, f"{held} chunks")
        log.warning("re-registered %s and re-published %d chunks: %s", self.instance_id, held, reason)

    def _command_loop(self) -> None:
        self.consumer.run(self._stop, on_lost_group=lambda: self._reregister("its command group vanished"))


def _address(config: KVBusConfig, worker_id: int) -> WorkerAddress:
    def pick(ports: tuple[int, ...] | None) -> int | None:
        if not ports:
            return None
        return ports[worker_id] if worker_id < len(ports) else None

    peer_port = pick(config.p2p_init_ports)
    host = config.p2p_host or "127.0.0.1"
    return WorkerAddress(
        host=host,
        port=pick(config.lmcache_worker_ports),
        peer_init_url=f"{host}:{peer_port}" if peer_port is not None else None,
    )
