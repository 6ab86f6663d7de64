"""Taking one worker (rank) out of Redis, the same for a kvbus agent and for an LMCache worker.

A rank takes only what is its own: other ranks of the instance may still be serving, and only
the last one takes the instance away (its registration, heartbeat key and command stream).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvbus.shared import keys

# KEYS: 1 the workers set, 2 the instance set, 3 the worker's record, then n keys of the rank's own
# (index, heads, LMCache state), then m sets the rank is a member of, then the instance's own keys.
# ARGV: 1 the worker id, 2 the instance id, 3 n, 4 m, 5 the rank's member of those sets.
# Returns 1 when this was the instance's last worker.
SCRIPT = """
local n, m = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
if n > 0 then redis.call('UNLINK', unpack(KEYS, 4, 3 + n)) end
for i = 4 + n, 3 + n + m do redis.call('SREM', KEYS[i], ARGV[5]) end
if redis.call('SCARD', KEYS[1]) > 0 then return 0 end
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('UNLINK', KEYS[1], unpack(KEYS, 4 + n + m))
return 1
"""


def script_args(
    instance_id: str, worker_id: int, *, own: Sequence[str], memberships: Sequence[str] = ()
) -> tuple[list[str], list[str | int]]:
    """The KEYS and ARGV of `SCRIPT` for one rank."""
    script_keys = [
        keys.workers(instance_id),
        keys.INSTANCES,
        keys.worker(instance_id, worker_id),
        *own,
        *memberships,
        keys.info(instance_id),
        keys.alive(instance_id),
        keys.commands(instance_id),
    ]
    args: list[str | int] = [
        worker_id,
        instance_id,
        len(own),
        len(memberships),
        keys.head_member(instance_id, worker_id),
    ]
    return script_keys, args
