"""Every Redis key kvbus uses, and nothing else. No other module spells a key.

Per-instance keys carry the hash tag `{instance_id}`, so an instance's command stream
and its index share one Redis Cluster slot. docs/redis-keys.md shows how to inspect each.
"""

from __future__ import annotations

import hashlib
import zlib

PREFIX = "kvbus"

# Global keys.
INSTANCES = f"{PREFIX}:instances"  # SET of registered instance ids
HASH_SPACES = f"{PREFIX}:hashspaces"  # SET of "<chunk_size>:<model>" the fleet hashes with
LOCATIONS = f"{PREFIX}:locations"  # SET of the locations any agent keeps chunks at
LIFECYCLE = f"{PREFIX}:lifecycle"  # STREAM of agents registering, leaving, resyncing, reaped; capped
LIFECYCLE_MAXLEN = 10_000
REAPER_LOCK = f"{PREFIX}:reaper"  # STRING with a TTL: the controller replica reaping this round
JOURNAL = f"{PREFIX}:journal"  # STREAM of every command sent and every result returned, capped
JOURNAL_MAXLEN = 100_000
# Command records are spread over this many shards, each its own hash tag, so that no one slot takes
# every command's writes on a cluster; each shard keeps its share of event_retention_count.
COMMAND_SHARDS = 16


def head(location: str, first_chunk: str) -> str:
    """SET of the ranks holding, at `location`, the first chunk of a prompt: lookup's candidate filter.

    Its members are `head_member(instance_id, worker_id)`, one per rank, so that a rank withdrawing
    its hint never withdraws another rank's.
    """
    return f"{PREFIX}:head:{location}:{first_chunk}"


def head_member(instance_id: str, worker_id: int) -> str:
    """A member of a head() set: `<worker_id>:<instance_id>` (the worker id is digits, so the first ':' splits)."""
    return f"{worker_id}:{instance_id}"


def head_holder(member: str) -> tuple[str, int] | None:
    """The (instance id, worker id) a head() member names; None for a member of any other form."""
    worker, colon, instance_id = member.partition(":")
    if not colon or not instance_id or not (worker.isascii() and worker.isdigit()):
        return None
    return instance_id, int(worker)


def command_shard(event_id: str) -> int:
    """The shard of `event_id`'s record: a stable hash of the id, the same in every process."""
    return zlib.crc32(event_id.encode()) % COMMAND_SHARDS


def _commands_tag(shard: int) -> str:
    return f"{PREFIX}:{{commands:{shard}}}"


def command_record(event_id: str) -> str:
    """HASH with a TTL: what /check_finish reads about one command (records.CommandRecord)."""
    return f"{_commands_tag(command_shard(event_id))}:command:{event_id}"


def command_records(shard: int) -> str:
    """LIST of the event ids of the command records one shard keeps, oldest first: the controller drops
    the oldest records past the shard's share of event_retention_count, and ids whose record already
    expired (event_retention)."""
    return f"{_commands_tag(shard)}:ids"


def command_record_prefix(shard: int) -> str:
    """What `command_record` puts before the event id, for every id of `shard`."""
    return f"{_commands_tag(shard)}:command:"


# Each worker's heartbeat summary (records.FleetEntry) is one field of one of this many hashes, picked by
# its instance id: a scrape reads them all at once, and no one key or cluster slot holds the whole fleet.
FLEET_SHARDS = 32


def fleet_shard(instance_id: str) -> str:
    """HASH `<worker_id>:<instance_id>` -> records.FleetEntry, for the instances whose ids hash to it."""
    return f"{PREFIX}:fleet:{zlib.crc32(instance_id.encode()) % FLEET_SHARDS}"


def fleet_shards() -> list[str]:
    """Every fleet_shard key: what /metrics and the dashboard read."""
    return [f"{PREFIX}:fleet:{shard}" for shard in range(FLEET_SHARDS)]


def results(controller_id: str) -> str:
    """STREAM of agent results for one controller process."""
    return f"{PREFIX}:ctl:{controller_id}:results"


# Per-instance keys.
def _instance(instance_id: str) -> str:
    return f"{PREFIX}:{{{instance_id}}}"


def info(instance_id: str) -> str:
    """HASH: the instance's model, chunk size and locations (records.InstanceInfo)."""
    return f"{_instance(instance_id)}:info"


def alive(instance_id: str) -> str:
    """STRING with a TTL, refreshed by the instance's agents: absent means nobody answers."""
    return f"{_instance(instance_id)}:alive"


def workers(instance_id: str) -> str:
    """SET of the instance's registered worker ids."""
    return f"{_instance(instance_id)}:workers"


def worker(instance_id: str, worker_id: int) -> str:
    """HASH: one worker's address, pid, heartbeat time and backend stats (records.WorkerRecord)."""
    return f"{_instance(instance_id)}:worker:{worker_id}"


def beat_wake(instance_id: str, worker_id: int) -> str:
    """LIST, empty but for a moment: each heartbeat of one worker waits its interval in Redis, blocked on it
    (BLPOP), and a stopping agent pushes onto it to end the wait. Pushed with a TTL, so nothing outlives that."""
    return f"{_instance(instance_id)}:worker:{worker_id}:wake"


def commands(instance_id: str) -> str:
    """STREAM of commands for the instance; each worker reads it through its own group."""
    return f"{_instance(instance_id)}:cmd"


def command_group(worker_id: int) -> str:
    """Consumer group (and consumer) name of one worker on the command stream."""
    return f"worker-{worker_id}"


def index(instance_id: str, worker_id: int, location: str) -> str:
    """HASH chunk key -> token count of every chunk one rank of the instance holds at `location`."""
    return f"{_instance(instance_id)}:idx:{worker_id}:{location}"


# A field of no index hash: set and deleted again inside one transaction by a writer that is about to add
# more fields than Redis 7.0 keeps in a compact listpack (see agent/index_writer.py), only for its length.
# A name longer than hash-max-listpack-value (64 bytes by default) makes Redis turn the hash into a
# hashtable at once; no chunk key is this long.
INDEX_HASHTABLE_NOW = "kvbus:index:hashtable-now:" + "." * 102


def script_key_parts() -> tuple[str, str, str, str]:
    """For a script that builds many instances' keys from their ids (lookup's walk): with parts `head, alive_,
    workers_, index_`, `head..id..alive_` is alive(id), `head..id..workers_` is workers(id) and
    `head..id..index_..worker..':'..location` is index(id, worker, location)."""
    return f"{PREFIX}:{{", "}:alive", "}:workers", "}:idx:"


def heads(instance_id: str, worker_id: int, location: str) -> str:
    """SET of the first-chunk keys one rank holds at `location`: its members of head() to withdraw on clear."""
    return f"{_instance(instance_id)}:heads:{worker_id}:{location}"


def done(instance_id: str, worker_id: int, event_id: str) -> str:
    """STRING with a TTL: the result a worker sent for `event_id`, so a redelivery is not executed twice."""
    return f"{_instance(instance_id)}:done:{worker_id}:{event_id}"


def space_instances(space_name: str) -> str:
    """SET of the ranks whose chunks are in a hash space without head hints (LMCache's: its workers
    report bare chunk hashes, so no one knows which chunk starts a prompt), as `head_member`s:
    lookup's candidates in that space."""
    return f"{PREFIX}:space:{space_name}:instances"


def lmcache_sync(instance_id: str, worker_id: int) -> str:
    """HASH: an LMCache worker's op sequence and full-sync state (records.LMCacheSync)."""
    return f"{_instance(instance_id)}:lmcache:{worker_id}"


# Members are head_member(instance_id, worker_id): the controllers that relay commands to LMCache
# workers read each one's command stream through this.
LMCACHE_WORKERS = f"{PREFIX}:lmcache:workers"  # SET of every registered LMCache worker


def lmcache_probe(instance_id: str, worker_id: int) -> str:
    """STRING with a TTL: which controller checks, by a health message, that an LMCache worker that sends
    no heartbeats is still alive."""
    return f"{_instance(instance_id)}:lmcache:{worker_id}:probe"


def ticket(instance_id: str, token: bytes) -> str:
    """HASH with a TTL: what the ticket whose token is `token` lets a /move's source rank send into the
    instance (records.MoveTicket). Named by the token's SHA-256, so that reading the key names, say with
    SCAN, gives no one a ticket to show."""
    return f"{_instance(instance_id)}:ticket:{hashlib.sha256(token).hexdigest()}"
