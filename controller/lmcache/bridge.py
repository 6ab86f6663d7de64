"""LMCache's worker protocol in one controller process: the monitor sockets, when ports are configured,
and the relay of commands to LMCache workers, which every replica runs (it idles while there are none)."""

from __future__ import annotations

import asyncio
import logging
import os

from kvbus.controller.lmcache.monitor import Monitor, MonitorPorts
from kvbus.controller.lmcache.relay import Relay
from kvbus.controller.lmcache.workers import LMCacheWorkers
from kvbus.shared import redis_conn
from kvbus.shared.config import KVBusConfig
from kvbus.shared.hashing import LMCacheHashSpace, vllm_none_hash

log = logging.getLogger("kvbus.controller.lmcache")


def hash_space(config: KVBusConfig, environ: dict[str, str] | None = None) -> LMCacheHashSpace:
    """The space LMCache engines key their chunks in: LMCache's documented set-up runs every engine and the
    controller with one PYTHONHASHSEED, so the controller's own seed stands for theirs unless configured."""
    if config.lmcache_none_hash is not None:
        return LMCacheHashSpace(config.chunk_size, config.lmcache_none_hash)
    seed = config.lmcache_hash_seed
    if seed is None:
        text = (os.environ if environ is None else environ).get("PYTHONHASHSEED", "")
        seed = int(text) if text.isdigit() else None
    return LMCacheHashSpace(config.chunk_size, vllm_none_hash(seed) if seed is not None else 0)


class Bridge:
    def __init__(self, client: redis_conn.AsyncClient, config: KVBusConfig, *, controller_id: str) -> None:
        self._redis = client
        self._config = config
        self._controller_id = controller_id
        self._reader: redis_conn.AsyncClient | None = None
        self._relay: Relay | None = None
        self._relaying: asyncio.Task[None] | None = None
        self._monitor: Monitor | None = None

    async def start(self) -> None:
        config = self._config
        self._reader = await redis_conn.connect_async(config.redis_url, blocking=True)
        self._relay = Relay(
            self._redis,
            self._reader,
            consumer=self._controller_id,
            heartbeat_interval_s=config.heartbeat_interval,
            heartbeat_ttl_s=config.heartbeat_ttl,
            event_retention_s=config.event_retention,
        )
        if config.controller_monitor_ports is not None:
            ports = _ports(config.controller_monitor_ports)
            heartbeat_url = f"{config.controller_host}:{ports.heartbeat}" if ports.heartbeat is not None else ""
            workers = LMCacheWorkers(
                self._redis, hash_space(config), heartbeat_ttl_s=config.heartbeat_ttl, heartbeat_url=heartbeat_url
            )
            self._monitor = Monitor(workers, config.controller_host, ports)
            self._monitor.bind()
        self._relaying = asyncio.create_task(self._relay.run(), name="lmcache-relay")

    def messages(self) -> dict[str, int]:
        """LMCache messages this process's sockets received since start, per socket; empty when none are bound."""
        return dict(self._monitor.received) if self._monitor is not None else {}

    async def stop(self) -> None:
        if self._monitor is not None:
            await self._monitor.stop()
        if self._relay is not None:
            await self._relay.stop()
        if self._relaying is not None:
            self._relaying.cancel()
            await asyncio.gather(self._relaying, return_exceptions=True)
        if self._reader is not None:
            await self._reader.aclose()


def _ports(ports: dict[str, int]) -> MonitorPorts:
    return MonitorPorts(pull=ports["pull"], reply=ports["reply"], heartbeat=ports.get("heartbeat"))
