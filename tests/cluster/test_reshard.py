"""A busy instance's slot moved to another master while clears and lookups run: nothing is lost, every
request is answered, and the instance works from its new master."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from kvbus.shared import keys
from kvbus.shared.locations import Location
from tests.cluster.conftest import (
    CLIENT_TIMEOUT_S,
    CPU,
    Load,
    busy_fleet,
    check_answered,
    check_index,
    command_events,
    ids_on_masters,
    mixed_requests,
    move_slot,
    post,
    seed_url,
    summary,
)
from tests.conftest import Processes, RedisClusterServers


@pytest.mark.timeout(180)
def test_a_busy_instance_s_slot_moved_to_another_master_loses_nothing(
    own_cluster: RedisClusterServers, procs: Processes
) -> None:
    url = seed_url(own_cluster)
    ids = ids_on_masters(own_cluster, "reshard")
    _, base = procs.controller(url, timeout=2.0)
    held = busy_fleet(procs, url, base, ids)
    busy = ids[0]
    slot = redis.crc.key_slot(keys.alive(busy).encode())
    source = own_cluster.master_of(keys.alive(busy))
    target = own_cluster.master_of(keys.alive(ids[1]))

    load = Load(base, mixed_requests(held)).start()
    time.sleep(1.0)
    started = time.monotonic()
    moved = move_slot(own_cluster, slot, target)
    took = time.monotonic() - started
    time.sleep(1.5)
    outcomes = load.stop()
    print(f"\nreshard: {moved} keys of {busy} moved {source} -> {target} in {took:.2f} s; {summary(outcomes)}")
    check_answered(outcomes)

    assert moved >= 5  # its alive key, info, workers, worker, command stream, index and heads at least
    assert own_cluster.master_of(keys.alive(busy)) == target
    with redis.Redis(port=source) as old, redis.Redis(port=target) as new:
        assert old.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert new.hlen(keys.index(busy, 0, Location.CPU)) == 3  # the pinned prompt's chunks, nothing lost
    assert check_index(base, held)
    assert post(base, "/clear", {"instance_id": busy, "location": CPU})["num_tokens"] == 0
    pinned, _ = held[busy]
    assert post(base, "/unpin", {"instance_id": busy, "location": CPU, "tokens": pinned})["num_tokens"] == 600
    assert post(base, "/clear", {"instance_id": busy, "location": CPU})["num_tokens"] == 600

    # Nothing was lost, so every command is known to /check_finish, with its outcome.
    time.sleep(4.5)  # past the last command's deadline and the grace after it
    with httpx.Client(base_url=base, timeout=CLIENT_TIMEOUT_S) as client:
        for outcome, event_id in command_events(outcomes):
            told = client.post("/check_finish", json={"event_id": event_id})
            if outcome.status == 503 and told.status_code == 404:
                continue  # its send never reached Redis
            assert told.status_code == 200, (outcome, told.text)
            status = told.json()["status"]
            assert status in ("finished", "failed", "expired"), (outcome.status, told.json())
            if outcome.status == 200:
                assert status == "finished", (outcome.answer, told.json())
