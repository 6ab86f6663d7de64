"""Taking one worker (rank) out of Redis, the same for a kvbus agent and for an LMCache worker.

A rank takes only what is its own: other ranks of the instance may still be serving, and only
the last one takes the instance away (its registration, heartbeat key and command stream).

On Redis Cluster a script may touch one hash slot only, so the work is three steps. `SCRIPT` runs
over the instance's own keys (all in its `{instance_id}` slot), atomically as before. Then the
fleet-wide sets, in other slots, are withdrawn from in a plain pipeline (`leave_sets`): the rank's
member from each set it is in, and the instance from `keys.INSTANCES` when it was the last. That
order is safe: for the moment between the steps those sets still name a rank whose keys are gone,
and every reader verifies such a hint against the per-instance keys (lookup reads the rank's
index, the fleet read its registration, the relay its worker record), so it matches nothing. The
reverse order would hide a rank that still serves. Last, the instance's workers set is read again,
which closes the one race the split opens: a rank that registers again between the script and the
withdrawal would otherwise lose its fresh memberships for good, its next heartbeat finding its
registration in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeAlias

from kvbus.shared import keys, redis_conn

# KEYS: 1 the workers set, 2 the worker's record, then n keys of the rank's own (index, heads,
# LMCache state), then the instance's own keys. ARGV: 1 the worker id, 2 n.
# Returns 1 when this was the instance's last worker.
SCRIPT = """
local n = tonumber(ARGV[2])
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
if n > 0 then redis.call('UNLINK', unpack(KEYS, 3, 2 + n)) end
if redis.call('SCARD', KEYS[1]) > 0 then return 0 end
redis.call('UNLINK', KEYS[1], unpack(KEYS, 3 + n))
return 1
"""

Pipe: TypeAlias = "redis_conn.Pipeline | redis_conn.AsyncPipeline"


def script_args(instance_id: str, worker_id: int, *, own: Sequence[str]) -> tuple[list[str], list[str | int]]:
    """The KEYS and ARGV of `SCRIPT` for one rank: keys of one slot, the instance's."""
    script_keys = [
        keys.workers(instance_id),
        keys.worker(instance_id, worker_id),
        *own,
        keys.info(instance_id),
        keys.alive(instance_id),
        keys.commands(instance_id),
    ]
    return script_keys, [worker_id, len(own)]


def _withdraw(pipe: Pipe, instance_id: str, memberships: Iterable[tuple[str, int]], *, last: bool) -> None:
    """Queue the fleet-wide removals, after the instance's own keys are gone: each (set, rank)'s
    member, and the instance from the instance set when no rank is left."""
    for set_key, worker_id in memberships:
        pipe.srem(set_key, keys.head_member(instance_id, worker_id))
    if last:
        pipe.srem(keys.INSTANCES, instance_id)


def _restore(
    pipe: Pipe,
    instance_id: str,
    memberships: Iterable[tuple[str, int]],
    registered: Iterable[str | bytes],
    *,
    last: bool,
) -> None:
    """Queue adding back what `_withdraw` took from ranks registered again since (`registered`: the
    instance's workers set, read after the withdrawal). A head hint put back for a chunk the rank no
    longer holds is harmless: lookup verifies it against the rank's index."""
    ranks = {int(worker_id) for worker_id in registered}
    for set_key, worker_id in memberships:
        if worker_id in ranks:
            pipe.sadd(set_key, keys.head_member(instance_id, worker_id))
    # Only a withdrawal that took the instance out puts it back: ranks leaving side by side (every
    # rank of a tensor-parallel engine at shutdown) would otherwise list an instance none has.
    if last and ranks:
        pipe.sadd(keys.INSTANCES, instance_id)


def leave_sets(
    client: redis_conn.Client, instance_id: str, memberships: Sequence[tuple[str, int]], *, last: bool
) -> None:
    """The fleet-wide step, once the instance's own keys are gone: out of each (set, rank)'s member and,
    when `last`, of the instance set; back in for a rank that registered again meanwhile."""
    if not memberships and not last:
        return
    pipe = client.pipeline(transaction=False)
    _withdraw(pipe, instance_id, memberships, last=last)
    pipe.execute()
    registered = client.smembers(keys.workers(instance_id))
    pipe = client.pipeline(transaction=False)
    _restore(pipe, instance_id, memberships, registered, last=last)
    pipe.execute()


async def leave_sets_async(
    client: redis_conn.AsyncClient, instance_id: str, memberships: Sequence[tuple[str, int]], *, last: bool
) -> None:
    """`leave_sets` for the controller's event loop."""
    if not memberships and not last:
        return
    pipe = client.pipeline(transaction=False)
    _withdraw(pipe, instance_id, memberships, last=last)
    await pipe.execute()
    registered = await client.smembers(keys.workers(instance_id))
    pipe = client.pipeline(transaction=False)
    _restore(pipe, instance_id, memberships, registered, last=last)
    await pipe.execute()


def deregister(
    client: redis_conn.Client, instance_id: str, worker_id: int, *, own: Sequence[str], memberships: Sequence[str] = ()
) -> bool:
    """Take the rank out (its keys in `own`, its member out of each of `memberships`); True if it was the last."""
    script_keys, args = script_args(instance_id, worker_id, own=own)
    last = bool(client.eval(SCRIPT, len(script_keys), *script_keys, *args))
    leave_sets(client, instance_id, [(set_key, worker_id) for set_key in memberships], last=last)
    # The rank's fleet entry is in a fleet shard's slot, not the instance's: it goes in a call of its own.
    client.hdel(keys.fleet_shard(instance_id), keys.head_member(instance_id, worker_id))
    return last


async def deregister_async(
    client: redis_conn.AsyncClient,
    instance_id: str,
    worker_id: int,
    *,
    own: Sequence[str],
    memberships: Sequence[str] = (),
) -> bool:
    """`deregister` for the controller's event loop."""
    script_keys, args = script_args(instance_id, worker_id, own=own)
    last = bool(await client.eval(SCRIPT, len(script_keys), *script_keys, *args))
    await leave_sets_async(client, instance_id, [(set_key, worker_id) for set_key in memberships], last=last)
    await client.hdel(keys.fleet_shard(instance_id), keys.head_member(instance_id, worker_id))
    return last
