"""Who is registered, read straight from Redis on every call: LMCache's worker and key-count queries.

LMCache serves "all" from a 30 s cache that can be stale; these reads cost a few pipelined
round trips and are always current.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio

from kvbus.controller.errors import UnknownInstance, UnknownWorker
from kvbus.shared import keys


@dataclass(frozen=True)
class Instance:
    instance_id: str
    workers: list[dict[str, Any]]
    key_count: int  # chunks indexed over all locations; ranks of one instance share the index


class Registry:
    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._redis = client

    async def instances(self, only: str | None = None) -> list[Instance]:
        """Registered instances (or just `only`, 404 if unknown), each with its workers, by id."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.smembers(keys.INSTANCES)
        pipe.smembers(keys.LOCATIONS)
        registered, locations = await pipe.execute()
        ids = sorted(registered) if only is None else [only]
        if only is not None and only not in registered:
            raise UnknownInstance(f"unknown instance_id {only!r}: no agent has registered it")
        pipe = self._redis.pipeline(transaction=False)
        for instance_id in ids:
            pipe.smembers(keys.workers(instance_id))
            for location in sorted(locations):
                pipe.hlen(keys.index(instance_id, location))
        replies = await pipe.execute()
        step = 1 + len(locations)
        worker_ids = [sorted(int(w) for w in replies[i * step]) for i in range(len(ids))]
        key_counts = [sum(replies[i * step + 1 : (i + 1) * step]) for i in range(len(ids))]
        pipe = self._redis.pipeline(transaction=False)
        for instance_id, workers in zip(ids, worker_ids, strict=True):
            for worker_id in workers:
                pipe.hgetall(keys.worker(instance_id, worker_id))
        hashes = iter(await pipe.execute())
        return [
            Instance(instance_id, [_worker_info(next(hashes)) for _ in workers], count)
            for instance_id, workers, count in zip(ids, worker_ids, key_counts, strict=True)
        ]

    async def worker(self, instance_id: str, worker_id: int) -> dict[str, Any]:
        (instance,) = await self.instances(instance_id)
        for info in instance.workers:
            if info["worker_id"] == worker_id:
                return {**info, "key_count": instance.key_count}
        raise UnknownWorker(f"instance {instance_id!r} has no worker {worker_id}", instance_id=instance_id)

    async def instance_at(self, ip: str) -> str | None:
        """The earliest-registered instance with a worker at `ip`, as LMCache's /query_instance."""
        holders = [
            (w["registration_time"], instance.instance_id)
            for instance in await self.instances()
            for w in instance.workers
            if w["ip"] == ip
        ]
        return min(holders)[1] if holders else None


def _worker_info(fields: dict[str, str]) -> dict[str, Any]:
    """LMCache's worker_info shape, plus the layout and liveness details kvbus records."""
    port = fields.get("port", "")
    info: dict[str, Any] = {
        "instance_id": fields.get("instance_id", ""),
        "worker_id": int(fields.get("worker_id", -1)),
        "ip": fields.get("ip", ""),
        "port": int(port) if port else None,
        "peer_init_url": fields.get("peer_init_url") or None,
        "registration_time": float(fields.get("registration_time", 0)),
        "last_heartbeat_time": float(fields.get("last_heartbeat_time", 0)),
    }
    for extra in ("pid", "hostname", "layout"):
        if fields.get(extra):
            info[extra] = int(fields[extra]) if extra == "pid" else fields[extra]
    return info


def key_stats(instances: list[Instance]) -> dict[str, Any]:
    return {
        "total_key_count": sum(i.key_count for i in instances),
        "total_instance_count": len(instances),
        "total_worker_count": sum(len(i.workers) for i in instances),
        "instances": [
            {"instance_id": i.instance_id, "key_count": i.key_count, "worker_count": len(i.workers)} for i in instances
        ],
    }
