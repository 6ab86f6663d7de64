"""LMCache's worker and key-count views (registry.py) over fleets built here: which fields each answer
carries, how instances and workers are found, and which instance answers for an ip."""

from __future__ import annotations

import msgspec
import pytest

from kvbus.controller import registry
from kvbus.controller.answers import InstanceKeyCount, KeyStatsAnswer, WorkerInfo
from kvbus.controller.errors import UnknownInstance, UnknownWorker
from kvbus.controller.fleet import Fleet, Instance, Worker
from kvbus.shared.records import WorkerRecord


def worker(
    instance_id: str,
    worker_id: int,
    ip: str = "10.0.0.1",
    registered: float = 100.0,
    index: dict[str, int] | None = None,
    **fields: object,
) -> Worker:
    """A worker as fleet.read gives it, with its own `index` sizes; `fields` set the rest of its record."""
    record = WorkerRecord(
        instance_id=instance_id,
        worker_id=worker_id,
        ip=ip,
        registration_time=registered,
        last_heartbeat_time=registered + 50,
    )
    return Worker(msgspec.structs.replace(record, **fields), heartbeat_age_s=1.0, backlog=None, index=index or {})


FLEET = Fleet(
    now_s=200.0,
    locations=["LocalCPUBackend", "LocalDiskBackend"],
    instances=[
        Instance(
            "a",
            alive=True,
            workers=[
                worker("a", 0, ip="10.0.0.2", registered=90.0, index={"LocalCPUBackend": 3, "LocalDiskBackend": 2}),
                worker("a", 1, registered=90.0, index={"LocalCPUBackend": 3, "LocalDiskBackend": 0}),
            ],
        ),
        Instance("b", alive=False, workers=[worker("b", 0, index={"LocalCPUBackend": 0, "LocalDiskBackend": 4})]),
        Instance("c", alive=True, workers=[]),
    ],
)


def test_worker_info_is_lmcache_s_shape_plus_only_what_kvbus_knows() -> None:
    bare = registry.worker_info(worker("a", 0))
    assert msgspec.to_builtins(bare) == {
        "instance_id": "a",
        "worker_id": 0,
        "ip": "10.0.0.1",
        "port": 0,  # no LMCache REP port: LMCache's port is always an int
        "peer_init_url": None,  # LMCache's null, not the record's empty string
        "registration_time": 100.0,
        "last_heartbeat_time": 150.0,
    }
    full = registry.worker_info(
        worker("a", 1, port=8001, peer_init_url="10.0.0.1:9000", pid=42, hostname="gpu-1", layout="m|fp16|16|flash"),
        key_count=5,
    )
    assert full == WorkerInfo(
        instance_id="a",
        worker_id=1,
        ip="10.0.0.1",
        port=8001,
        peer_init_url="10.0.0.1:9000",
        registration_time=100.0,
        last_heartbeat_time=150.0,
        pid=42,
        hostname="gpu-1",
        layout="m|fp16|16|flash",
        key_count=5,
    )


def test_worker_infos_of_every_instance_or_of_the_worker_ids_asked() -> None:
    assert [(w.instance_id, w.worker_id) for w in registry.worker_infos(FLEET)] == [("a", 0), ("a", 1), ("b", 0)]
    assert [(w.instance_id, w.worker_id) for w in registry.worker_infos(FLEET, [0])] == [("a", 0), ("b", 0)]
    assert registry.worker_infos(FLEET, []) == []
    assert all(w.key_count is msgspec.UNSET for w in registry.worker_infos(FLEET))  # not in /query_worker_info


def test_workers_carry_their_own_key_count() -> None:
    listed = registry.workers(FLEET)
    assert listed.total_count == 3
    assert [(w.instance_id, w.worker_id, w.key_count) for w in listed.workers] == [
        ("a", 0, 5),
        ("a", 1, 3),
        ("b", 0, 4),
    ]
    one = registry.worker(FLEET, "b", 0)
    assert (one.instance_id, one.worker_id, one.key_count) == ("b", 0, 4)
    assert registry.worker(FLEET, "a", 1).key_count == 3  # its own, not its instance's


def test_two_ranks_one_holding_32_chunks_and_one_none_are_counted_as_lmcache_counts_them() -> None:
    """Issue 9's case: each worker has its own count, and the instance's is their sum."""
    held = Fleet(
        200.0,
        ["LocalCPUBackend"],
        [
            Instance(
                "tp",
                alive=True,
                workers=[worker("tp", 0, index={"LocalCPUBackend": 32}), worker("tp", 1, index={"LocalCPUBackend": 0})],
            )
        ],
    )
    assert [(w.worker_id, w.key_count) for w in registry.workers(held).workers] == [(0, 32), (1, 0)]
    assert registry.key_stats(held) == KeyStatsAnswer(32, 1, 2, [InstanceKeyCount("tp", 32, 2)])
    both = Fleet(
        200.0,
        ["LocalCPUBackend"],
        [
            Instance(
                "tp",
                alive=True,
                workers=[worker("tp", w, index={"LocalCPUBackend": 32}) for w in (0, 1)],
            )
        ],
    )
    assert registry.key_stats(both) == KeyStatsAnswer(64, 1, 2, [InstanceKeyCount("tp", 64, 2)])


def test_an_unknown_instance_or_worker_is_an_error_naming_it() -> None:
    assert registry.instance(FLEET, "c").workers == []  # registered, with no worker left: still known
    with pytest.raises(UnknownInstance, match="unknown instance_id 'ghost'"):
        registry.instance(FLEET, "ghost")
    with pytest.raises(UnknownInstance, match="'ghost'"):
        registry.worker(FLEET, "ghost", 0)
    with pytest.raises(UnknownWorker, match="instance 'a' has no worker 7") as raised:
        registry.worker(FLEET, "a", 7)
    assert raised.value.context == {"instance_id": "a"}


def test_the_instance_at_an_ip_is_the_earliest_registered_one_there() -> None:
    assert registry.instance_at(FLEET, "10.0.0.1") == "a"  # a's worker 1 registered at 90, b's worker at 100
    assert registry.instance_at(FLEET, "10.0.0.2") == "a"
    later_first = Fleet(200.0, [], [FLEET.instances[1], FLEET.instances[0]])
    assert registry.instance_at(later_first, "10.0.0.1") == "a"  # by time, not by order
    assert registry.instance_at(FLEET, "10.9.9.9") is None


def test_key_stats_count_every_instance_including_dead_and_empty_ones() -> None:
    assert registry.key_stats(FLEET) == KeyStatsAnswer(
        total_key_count=12,
        total_instance_count=3,
        total_worker_count=3,
        instances=[InstanceKeyCount("a", 8, 2), InstanceKeyCount("b", 4, 1), InstanceKeyCount("c", 0, 0)],
    )
    assert registry.key_stats(Fleet(200.0, [], [])) == KeyStatsAnswer(0, 0, 0, [])
