"""Who is registered, as LMCache's worker and key-count queries answer it: views over one fleet read.

LMCache serves "all" from a 30 s cache that can be stale; these views are read from Redis on
every call and are always current. As in LMCache, a worker's key count is its own (each rank
has its own index), and an instance's is the sum over its workers.
"""

from __future__ import annotations

from msgspec import UNSET

from kvbus.controller.answers import InstanceKeyCount, KeyStatsAnswer, WorkerInfo, WorkersAnswer
from kvbus.controller.errors import UnknownInstance, UnknownWorker
from kvbus.controller.fleet import Fleet, Instance, Worker


def instance(fleet: Fleet, instance_id: str) -> Instance:
    """The registered instance, or UnknownInstance (404)."""
    found = fleet.instance(instance_id)
    if found is None:
        raise UnknownInstance(f"unknown instance_id {instance_id!r}: no agent has registered it")
    return found


def worker_infos(fleet: Fleet, worker_ids: list[int] | None = None) -> list[WorkerInfo]:
    wanted = None if worker_ids is None else set(worker_ids)
    return [worker_info(w) for i in fleet.instances for w in i.workers if wanted is None or w.worker_id in wanted]


def worker_info(worker: Worker, key_count: int | None = None) -> WorkerInfo:
    """LMCache's worker_info shape, plus the process and layout details kvbus records."""
    record = worker.record
    return WorkerInfo(
        instance_id=record.instance_id,
        worker_id=record.worker_id,
        ip=record.ip,
        port=record.port if record.port is not None else 0,  # 0: no LMCache REP port (a kvbus agent)
        peer_init_url=record.peer_init_url or None,
        registration_time=record.registration_time,
        last_heartbeat_time=record.last_heartbeat_time,
        pid=record.pid if record.pid is not None else UNSET,
        hostname=record.hostname or UNSET,
        layout=record.layout or UNSET,
        key_count=key_count if key_count is not None else UNSET,
    )


def workers(fleet: Fleet) -> WorkersAnswer:
    listed = [worker_info(w, w.key_count) for i in fleet.instances for w in i.workers]
    return WorkersAnswer(workers=listed, total_count=len(listed))


def worker(fleet: Fleet, instance_id: str, worker_id: int) -> WorkerInfo:
    held = instance(fleet, instance_id)
    found = held.worker(worker_id)
    if found is None:
        raise UnknownWorker(f"instance {instance_id!r} has no worker {worker_id}", instance_id=instance_id)
    return worker_info(found, found.key_count)


def instance_at(fleet: Fleet, ip: str) -> str | None:
    """The earliest-registered instance with a worker at `ip`, as LMCache's /query_instance."""
    holders = [
        (w.record.registration_time, i.instance_id) for i in fleet.instances for w in i.workers if w.record.ip == ip
    ]
    return min(holders)[1] if holders else None


def key_stats(fleet: Fleet) -> KeyStatsAnswer:
    instances = fleet.instances
    return KeyStatsAnswer(
        total_key_count=sum(i.key_count for i in instances),
        total_instance_count=len(instances),
        total_worker_count=sum(len(i.workers) for i in instances),
        instances=[InstanceKeyCount(i.instance_id, i.key_count, len(i.workers)) for i in instances],
    )
