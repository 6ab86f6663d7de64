"""What a worker's fleet entry (records.FleetEntry) reads from the worker's own keys: its index sizes and its
command backlog. Agents read them at each heartbeat, controllers for LMCache workers; both queue the same
reads here, into a pipeline of their own (all in the instance's slot), and decode the replies here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from kvbus.shared import keys, redis_conn

Pipe: TypeAlias = "redis_conn.Pipeline | redis_conn.AsyncPipeline"


@dataclass(frozen=True)
class Found:
    index: dict[str, int]  # location -> chunks in the rank's index
    unacked: int | None  # None while the worker has no consumer group on the stream
    oldest_unacked_ms: int  # 0 when none is pending (see `after`)
    # Set when nothing is pending but commands are not read yet: the oldest unacked one is the first
    # entry after this id, which `queue_first_after` reads in a second round trip.
    after: str | None


def queue_reads(pipe: Pipe, instance_id: str, worker_id: int, locations: Sequence[str]) -> int:
    """Queue the reads `found` decodes; returns how many replies they take. Run the pipeline with
    raise_on_error=False: the group (or the whole stream, while an instance deregisters) may be gone."""
    for location in locations:
        pipe.hlen(keys.index(instance_id, worker_id, location))
    stream = keys.commands(instance_id)
    pipe.xlen(stream)
    pipe.xinfo_groups(stream)
    pipe.xpending(stream, keys.command_group(worker_id))
    return len(locations) + 3


# `queue_reads`'s reads as a Lua function, for a script that makes them inside a call of its own:
# `fleet_reads(index_keys, stream, group)` returns their replies in the same order, a read that fails
# (no group yet, no stream) as false, which `found` decodes as it decodes that read's error.
READS_LUA = """
local function fleet_reads(index_keys, stream, group)
  local out = {}
  for _, key in ipairs(index_keys) do out[#out + 1] = redis.call('HLEN', key) end
  out[#out + 1] = redis.call('XLEN', stream)
  local listed, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  out[#out + 1] = listed and groups
  local summed, pending = pcall(redis.call, 'XPENDING', stream, group)
  out[#out + 1] = summed and pending
  return out
end
"""


def found(replies: Iterator[Any], worker_id: int, locations: Sequence[str]) -> Found:
    """Decode what `queue_reads` queued, consuming exactly its replies."""
    index = {location: _count(next(replies)) for location in locations}
    length, groups, pending = next(replies), next(replies), next(replies)
    group = _group(groups, keys.command_group(worker_id))
    if group is None:
        return Found(index, None, 0, None)
    # Redis leaves the lag unknown only after XDEL, which kvbus never sends; the stream's length
    # bounds it then. Trimming can also leave it above the length: trimmed entries cannot be read.
    lag = group.get("lag")
    stream_length = _count(length)
    undelivered = stream_length if lag is None else min(int(lag), stream_length)
    delivered = int(group["pending"])
    if delivered:
        oldest = entry_ms(pending.get("min") if isinstance(pending, dict) else None)
        return Found(index, delivered + undelivered, oldest, None)
    return Found(index, undelivered, 0, group["last-delivered-id"] if undelivered else None)


def queue_first_after(pipe: Pipe, instance_id: str, entry_id: str) -> None:
    """Queue the read of the first command after `entry_id`: a `Found.after`'s oldest unacked command."""
    pipe.xrange(keys.commands(instance_id), min=f"({entry_id}", count=1)


def first_ms(reply: Any) -> int:
    """The time of the entry a `queue_first_after` read found; 0 if none is left (trimmed, or read meanwhile)."""
    return entry_ms(reply[0][0]) if isinstance(reply, list) and reply else 0


def entry_ms(entry_id: str | None) -> int:
    return int(entry_id.split("-", 1)[0]) if entry_id else 0


def _count(reply: Any) -> int:
    return reply if isinstance(reply, int) else 0


def _group(reply: Any, name: str) -> dict[str, Any] | None:
    if not isinstance(reply, list):
        return None  # the stream is gone: no group, no backlog
    return next((group for group in reply if group.get("name") == name), None)
