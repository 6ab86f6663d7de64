"""The whole fleet as Redis holds it right now, in three pipelined round trips: what /metrics and the dashboard show.

Per instance: its index size at each location, and per registered worker its heartbeat age, its
backends' stats (written by its last heartbeat) and its command backlog. Ages are in Redis server
time, which also stamps the command stream's entry ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from kvbus.shared import keys


@dataclass(frozen=True)
class Backlog:
    """Commands on the instance's stream that one worker has not acked, read or not."""

    unacked: int
    oldest_age_s: float  # 0 when there are none


@dataclass(frozen=True)
class Worker:
    worker_id: int
    fields: dict[str, str]  # the worker hash as the agent wrote it
    heartbeat_age_s: float | None  # None before the first heartbeat time is written
    stats: dict[str, dict[str, int]] | None  # location -> backend stats; None from agents that send none
    backlog: Backlog | None  # None while the worker has no consumer group on the stream


@dataclass(frozen=True)
class Instance:
    instance_id: str
    alive: bool  # its heartbeat key exists: what /lookup requires
    index: dict[str, int]  # location -> chunks indexed there
    workers: list[Worker]


@dataclass(frozen=True)
class Fleet:
    now_s: float  # Redis server time of the read
    locations: list[str]
    instances: list[Instance]


@dataclass(frozen=True)
class _Group:
    pending: int  # delivered, not acked
    undelivered: int
    last_delivered: str


async def read(client: redis.asyncio.Redis) -> Fleet:
    pipe = client.pipeline(transaction=False)
    pipe.smembers(keys.INSTANCES)
    pipe.smembers(keys.LOCATIONS)
    pipe.time()
    registered, known_locations, (seconds, micros) = await pipe.execute()
    now_ms = seconds * 1000 + micros // 1000
    ids, locations = sorted(registered), sorted(known_locations)

    pipe = client.pipeline(transaction=False)
    for instance_id in ids:
        pipe.smembers(keys.workers(instance_id))
        pipe.exists(keys.alive(instance_id))
        pipe.xlen(keys.commands(instance_id))
        pipe.xinfo_groups(keys.commands(instance_id))
        for location in locations:
            pipe.hlen(keys.index(instance_id, location))
    # XINFO GROUPS fails on an instance whose stream is gone (it is deregistering): no backlog then.
    replies = await pipe.execute(raise_on_error=False)
    step = 4 + len(locations)
    per_instance = [replies[n * step : (n + 1) * step] for n in range(len(ids))]
    workers = [sorted(int(w) for w in reply[0]) for reply in per_instance]
    groups = [_groups(reply[3], length=reply[2]) for reply in per_instance]

    pipe = client.pipeline(transaction=False)
    oldest_asked: set[tuple[int, int]] = set()  # (instance, worker) whose oldest unacked entry is read below
    for n, instance_id in enumerate(ids):
        for worker_id in workers[n]:
            pipe.hgetall(keys.worker(instance_id, worker_id))
            group = groups[n].get(keys.command_group(worker_id))
            if group is not None and group.pending:
                pipe.xpending(keys.commands(instance_id), keys.command_group(worker_id))
                oldest_asked.add((n, worker_id))
            elif group is not None and group.undelivered:
                # Nothing delivered is pending, so the oldest unacked entry is the first one not yet read.
                pipe.xrange(keys.commands(instance_id), min=f"({group.last_delivered}", count=1)
                oldest_asked.add((n, worker_id))
    replies = iter(await pipe.execute())

    instances = []
    for n, instance_id in enumerate(ids):
        listed = []
        for worker_id in workers[n]:
            fields = next(replies)
            group = groups[n].get(keys.command_group(worker_id))
            backlog = None
            if group is not None:
                oldest_ms = _entry_ms(next(replies)) if (n, worker_id) in oldest_asked else None
                backlog = Backlog(
                    group.pending + group.undelivered,
                    max(0.0, (now_ms - oldest_ms) / 1000) if oldest_ms is not None else 0.0,
                )
            listed.append(Worker(worker_id, fields, _age(fields, now_ms), _stats(fields), backlog))
        index = dict(zip(locations, per_instance[n][4:], strict=True))
        instances.append(Instance(instance_id, bool(per_instance[n][1]), index, listed))
    return Fleet(now_ms / 1000, locations, instances)


def _groups(reply: list[dict[str, Any]] | Exception, *, length: int) -> dict[str, _Group]:
    if isinstance(reply, Exception):
        return {}
    groups = {}
    for group in reply:
        # Redis leaves the lag unknown only after XDEL, which kvbus never sends; the stream's length
        # bounds it then. Trimming can also leave it above the length: trimmed entries cannot be read.
        lag = group.get("lag")
        undelivered = length if lag is None else min(int(lag), length)
        groups[group["name"]] = _Group(int(group["pending"]), undelivered, group["last-delivered-id"])
    return groups


def _entry_ms(reply: dict[str, Any] | list[tuple[str, dict[str, str]]]) -> int | None:
    """The ms part of the oldest entry id in an XPENDING summary or a one-entry XRANGE."""
    entry_id = reply.get("min") if isinstance(reply, dict) else (reply[0][0] if reply else None)
    return int(entry_id.split("-", 1)[0]) if entry_id else None


def _age(fields: dict[str, str], now_ms: int) -> float | None:
    beat = fields.get("last_heartbeat_time")
    # The agent writes its own clock's time; a skew against Redis's clock would read as a negative age.
    return max(0.0, now_ms / 1000 - float(beat)) if beat else None


def _stats(fields: dict[str, str]) -> dict[str, dict[str, int]] | None:
    raw = fields.get(keys.WORKER_STATS_FIELD)
    if not raw:
        return None
    try:
        stats = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return stats if isinstance(stats, dict) else None


def summary(fleet: Fleet, heartbeat_ttl_s: float) -> dict[str, Any]:
    """The fleet as JSON: instances with their index sizes and workers, each worker with its liveness,
    backend stats and command backlog."""
    return {
        "now": fleet.now_s,
        "locations": fleet.locations,
        "instances": [
            {
                "instance_id": instance.instance_id,
                "alive": instance.alive,
                "index_chunks": instance.index,
                "workers_registered": len(instance.workers),
                "workers_alive": sum(is_alive(w, heartbeat_ttl_s) for w in instance.workers),
                "workers": [_worker(w, heartbeat_ttl_s) for w in instance.workers],
            }
            for instance in fleet.instances
        ],
    }


def is_alive(worker: Worker, heartbeat_ttl_s: float) -> bool:
    return worker.heartbeat_age_s is not None and worker.heartbeat_age_s <= heartbeat_ttl_s


def _worker(worker: Worker, heartbeat_ttl_s: float) -> dict[str, Any]:
    fields = worker.fields
    return {
        "worker_id": worker.worker_id,
        "ip": fields.get("ip", ""),
        "hostname": fields.get("hostname", ""),
        "pid": int(fields["pid"]) if fields.get("pid", "").isdigit() else None,
        "heartbeat_age_s": worker.heartbeat_age_s,
        "alive": is_alive(worker, heartbeat_ttl_s),
        "stats": worker.stats,
        "unacked_commands": worker.backlog.unacked if worker.backlog else None,
        "oldest_unacked_age_s": worker.backlog.oldest_age_s if worker.backlog else None,
    }
