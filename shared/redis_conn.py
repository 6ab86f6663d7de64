"""Redis clients both sides use: one Redis or a Redis Cluster, short timeouts and few retries.

`redis_url` names one node (`redis://[user:password@]host:port/0`, `rediss://` for TLS) or a
list of a cluster's seed nodes (`redis://[user:password@]host1:port1,host2:port2/0`). A single
node is asked whether it runs in cluster mode (`INFO cluster`), so a URL naming any node of a
cluster gives a cluster client that discovers the rest; a list of seeds always does.

redis-py 8 retries 10 times with a 5 s socket timeout by default; a request would then hang
for a minute while Redis is down. Blocking readers get a socket timeout longer than their BLOCK.
A client that a request waits on (the vLLM scheduler's index reads) gets a far shorter bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeAlias, TypedDict

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.asyncio.retry
import redis.cluster
import redis.commands.core
import redis.retry
from redis.backoff import ExponentialWithJitterBackoff

from kvbus.shared.pipelined import Pipelined

log = logging.getLogger("kvbus.redis")

CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
BLOCK_MS = 1000  # XREAD/XREADGROUP BLOCK; kept well under the reader's socket timeout
# An agent's read of its commands on a connection of its own (a single Redis), which a stopping agent
# interrupts: every wake-up costs the idle engine that hosts it CPU, about 0.1-0.2 ms on a small VM.
IDLE_BLOCK_MS = 10_000
# A healthy Redis answers in well under a millisecond; a request waits at most about this (one try)
# on a stalled one, and a slow answer only costs a cache miss.
REQUEST_PATH_TIMEOUT_S = 0.5
# How long finding out whether the URL names a cluster may take, when Redis does not answer.
DETECT_TIMEOUT_S = 1.0

Client: TypeAlias = "redis.Redis | redis.cluster.RedisCluster"
AsyncClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster"
Pipeline: TypeAlias = "redis.client.Pipeline | redis.cluster.ClusterPipeline"
AsyncPipeline: TypeAlias = "redis.asyncio.client.Pipeline | redis.asyncio.cluster.ClusterPipeline"
Node: TypeAlias = "redis.asyncio.cluster.ClusterNode"

# A cluster failing over or moving slots, which redis-py gave up following: Redis is not there for this
# call, as when it is down. RedisClusterException (a slot no node serves yet) is not a RedisError.
CLUSTER_MOVING: tuple[type[Exception], ...] = (
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.AskError,
    redis.exceptions.RedisClusterException,
)
# Whatever a call to Redis may raise that a loop retries after a pause.
ERRORS: tuple[type[Exception], ...] = (redis.RedisError, *CLUSTER_MOVING)


class _Options(TypedDict):
    socket_connect_timeout: float
    socket_timeout: float
    retry_on_error: list[type[Exception]]
    health_check_interval: int
    decode_responses: Literal[True]


def _options(block_ms: int, request_path: bool = False) -> _Options:
    if request_path:
        connect_timeout = timeout = REQUEST_PATH_TIMEOUT_S
    else:
        connect_timeout, timeout = CONNECT_TIMEOUT_S, COMMAND_TIMEOUT_S + block_ms / 1000
    return {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": timeout,
        # Without this, pipelines do not retry at all: after a Redis restart the first pipeline
        # on each pooled (now dead) connection would fail. Every pipeline kvbus sends is safe
        # to repeat: index writes are idempotent and duplicate results are ignored by event id.
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 15,
        "decode_responses": True,
    }


def seed_urls(url: str) -> list[str]:
    """One URL per node that `url` names: `redis://pw@h1:1,h2:2/0` gives `redis://pw@h1:1/0` and `redis://pw@h2:2/0`."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return [url]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    credentials, at, hosts = netloc.rpartition("@")
    return [f"{scheme}://{credentials}{at}{host}{tail}" for host in hosts.split(",") if host]


# Per URL, whether it names a cluster, once a node has said so: every client of a process asks once.
_modes: dict[str, bool] = {}


def _decided(url: str) -> bool | None:
    if url in _modes:
        return _modes[url]
    if len(seed_urls(url)) > 1:
        return True
    return None


def _undecided(url: str, exc: redis.RedisError) -> bool:
    log.warning(
        "could not ask %s whether it runs Redis Cluster (%s); using it as a single node. For a cluster that "
        "may be down when kvbus starts, list two or more of its nodes in redis_url (host1:port1,host2:port2)",
        redacted(url),
        exc,
    )
    return False


def is_cluster(url: str) -> bool:
    """Whether `url` names a Redis Cluster (asks its node, once per process, within DETECT_TIMEOUT_S)."""
    decided = _decided(url)
    if decided is not None:
        return decided
    probe = redis.Redis.from_url(url, socket_connect_timeout=DETECT_TIMEOUT_S, socket_timeout=DETECT_TIMEOUT_S)
    try:
        _modes[url] = bool(probe.info("cluster").get("cluster_enabled"))
    except redis.RedisError as exc:
        return _undecided(url, exc)
    finally:
        probe.close()
    return _modes[url]


async def is_cluster_async(url: str) -> bool:
    """`is_cluster` without blocking the event loop."""
    decided = _decided(url)
    if decided is not None:
        return decided
    probe = redis.asyncio.Redis.from_url(url, socket_connect_timeout=DETECT_TIMEOUT_S, socket_timeout=DETECT_TIMEOUT_S)
    try:
        _modes[url] = bool((await probe.info("cluster")).get("cluster_enabled"))
    except redis.RedisError as exc:
        return _undecided(url, exc)
    finally:
        await probe.aclose()
    return _modes[url]


# redis-py's sync ClusterNode is unannotated; this names what it takes.
_SyncNode: Callable[..., redis.cluster.ClusterNode] = redis.cluster.ClusterNode


# redis-py's sync cluster client leaves this unannotated too.
_sync_node_of: Callable[[redis.cluster.RedisCluster, str], redis.cluster.ClusterNode | None] = (
    redis.cluster.RedisCluster.get_node_from_key
)


def _host_port(url: str) -> tuple[str, int]:
    """The host and port of a one-node URL; a port left out is 6379."""
    netloc = url.partition("://")[2].split("/")[0].split("?")[0].rpartition("@")[2]
    host, colon, port = netloc.rpartition(":")
    if not colon or "]" in port:
        return netloc.strip("[]") or "127.0.0.1", 6379
    return host.strip("[]") or "127.0.0.1", int(port)


def connect(url: str, *, blocking: bool = False, request_path: bool = False) -> Client:
    """A sync client, for agent threads that must not touch the engine's event loop.

    `blocking`: for the agent's command reads, which block up to IDLE_BLOCK_MS.
    `request_path`: for a caller a request waits on, which would rather miss than wait; each call
    is tried once, with REQUEST_PATH_TIMEOUT_S to connect and to read, instead of up to 3 x 5 s.
    """
    retry = redis.retry.Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 0 if request_path else 2)
    options = _options(IDLE_BLOCK_MS if blocking else 0, request_path)
    if is_cluster(url):
        first, *others = seed_urls(url)
        nodes = [_SyncNode(*_host_port(u)) for u in others] or None
        return redis.cluster.RedisCluster.from_url(first, retry=retry, startup_nodes=nodes, **options)
    return redis.Redis.from_url(url, retry=retry, **options)


async def connect_async(url: str, *, blocking: bool = False) -> AsyncClient:
    """An asyncio client, for the controller; `blocking`: for reads that block up to BLOCK_MS."""
    # The asyncio client needs the asyncio Retry: given the sync one it silently never retries.
    retry = redis.asyncio.retry.Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 2)
    options = _options(BLOCK_MS if blocking else 0)
    if await is_cluster_async(url):
        first, *others = seed_urls(url)
        nodes = [redis.asyncio.cluster.ClusterNode(*_host_port(u)) for u in others] or None
        return redis.asyncio.cluster.RedisCluster.from_url(first, retry=retry, startup_nodes=nodes, **options)
    return redis.asyncio.Redis.from_url(url, retry=retry, **options)


async def server_ms(client: AsyncClient) -> int:
    """Redis's clock, in ms, which commands' deadlines count in. Its own call: a cluster pipeline takes no TIME."""
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def serving_node(client: Client, key: str) -> str | None:
    """The address of the cluster node `client` sends `key` to now; None on a single Redis."""
    if not isinstance(client, redis.cluster.RedisCluster):
        return None
    node = _sync_node_of(client, key)
    return None if node is None else str(node.name)


async def routed(client: AsyncClient, key: str) -> dict[str, Any]:
    """Options that send a command about `key` straight to the node serving it: for XREAD and XREADGROUP,
    whose keys redis-py's cluster client otherwise asks its default node for (COMMAND GETKEYS), a round trip
    each time, and forever to a dead node once a failover took its master away. Nothing on a single Redis."""
    if not isinstance(client, redis.asyncio.cluster.RedisCluster):
        return {}
    await client.initialize()  # a client that has sent nothing yet knows no slot
    return {"target_nodes": client.get_node_from_key(key)}


async def heal(client: AsyncClient) -> None:
    """After a failed call, on a cluster: refresh the slot map and point redis-py's commands parser, which
    finds the keys of commands like XREADGROUP by asking a node, at a node that serves slots now. redis-py
    leaves it on the node it first chose, so once a failover takes that node away, every such command
    fails for good. Nothing on a single Redis; raises what the refresh meets while no node answers."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        await client.nodes_manager.initialize()
        client.commands_parser.node = client.get_default_node()


def by_node(client: AsyncClient, keys: list[str]) -> list[tuple[Node | None, list[int]]]:
    """The positions of `keys` grouped by the node that serves each one's slot now; one group (no node)
    on a single Redis. For work over many instances that one call per node can do."""
    if not isinstance(client, redis.asyncio.cluster.RedisCluster):
        return [(None, list(range(len(keys))))]
    groups: dict[str, tuple[Node, list[int]]] = {}
    for position, key in enumerate(keys):
        node = client.get_node_from_key(key)
        if node is None:
            raise redis.exceptions.ClusterDownError(f"no node serves the slot of {key!r}")
        groups.setdefault(node.name, (node, []))[1].append(position)
    return list(groups.values())


async def run_script(
    via: Pipelined | redis.asyncio.cluster.RedisCluster,
    script: redis.commands.core.AsyncScript,
    keys: list[str],
    args: list[str | int],
    node: Node | None,
) -> Any:
    """Run `script` on a single Redis (`via` its pipelined connection) or on a cluster's `node`, its keys spanning
    that node's slots: a script flagged `allow-cross-slot-keys` may touch any key the node serves. Loads the
    script where it is missing."""
    if isinstance(via, Pipelined):
        return await via.run_script(script, keys, args)
    if node is None:
        return await script(keys=keys, args=args)
    try:
        return await via.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, target_nodes=node)
    except redis.exceptions.NoScriptError:
        await via.execute_command("SCRIPT LOAD", script.script, target_nodes=node)
        return await via.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, target_nodes=node)


def scripts_via(
    client: AsyncClient, *, timeout_s: float | None = None
) -> Pipelined | redis.asyncio.cluster.RedisCluster:
    """What `run_script` sends through for `client`: on a single Redis, a pipelined connection of its own (the
    caller closes it), since a script per request through the pool costs ~30 us of CPU more a call. There
    `timeout_s` bounds each script's call (Pipelined's); a cluster's calls are the caller's to bound."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        return client
    return Pipelined(client.connection_pool, timeout_s=timeout_s)


async def warm(client: AsyncClient, connections: int, scripts: list[redis.commands.core.AsyncScript]) -> None:
    """Open `connections` pooled connections and load `scripts` now, so that a first burst of requests finds
    them ready rather than paying a connect (and a NOSCRIPT round trip) each. On a cluster, only the scripts:
    its node connections open as slots are first used."""
    for script in scripts:
        await client.script_load(script.script)  # on a cluster, redis-py sends SCRIPT LOAD to every primary
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        return
    pool = client.connection_pool
    acquire: Callable[[], Awaitable[redis.asyncio.connection.AbstractConnection]] = pool.get_connection
    opened = await asyncio.gather(*(acquire() for _ in range(connections)), return_exceptions=True)
    for connection in opened:
        if not isinstance(connection, BaseException):
            await pool.release(connection)


def slot_moved(exc: BaseException) -> bool:
    """Whether `exc` says a cluster node no longer serves (all) the keys it was sent: its slots moved."""
    if isinstance(exc, (redis.exceptions.AskError, redis.exceptions.TryAgainError)):  # MOVED is an AskError
        return True
    return isinstance(exc, redis.ResponseError) and "non local key" in str(exc)


def redacted(url: str) -> str:
    """The URL without its password, for logs and banners."""
    head, sep, tail = url.rpartition("@")
    return f"{head.split('://')[0]}://***@{tail}" if sep else url
