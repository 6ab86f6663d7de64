"""LMCache workers on kvbus, through the controller's monitor sockets and relay, against real Redis.

Workers here are `FakeLMCacheWorker`s (LMCache's protocol over pyzmq); the LMCache tier runs LMCache's
own worker code. Each test gets its own controller app with its own monitor ports.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from starlette.testclient import TestClient

from kvbus.controller.lmcache import wire
from kvbus.shared import keys
from kvbus.shared.config import KVBusConfig
from kvbus.shared.records import LMCacheSync, WorkerProtocol, WorkerRecord
from tests.conftest import SEED_TOKENS, free_port, wait_for
from tests.controller.conftest import CheckedClient
from tests.controller.lmcache.fake_worker import FakeLMCacheWorker
from tests.shared.test_deregistration import on_distinct_masters

CPU = "LocalCPUBackend"
PROMPT = list(range(1000, 1600))  # 256 + 256 + 88 tokens

REDIS_BACKENDS = ("single", "cluster")


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    ports = {"pull": free_port(), "reply": free_port(), "heartbeat": free_port()}
    return KVBusConfig(redis_url=redis_url, command_timeout=2.0, controller_monitor_ports=ports)


@pytest.fixture
def client(config: KVBusConfig, real_redis: redis.Redis) -> Iterator[TestClient]:
    real_redis.flushdb()
    from kvbus.controller.app import create_app

    with CheckedClient(create_app(config)) as test_client:
        yield test_client


def make_worker(config: KVBusConfig, instance_id: str, worker_id: int = 0) -> FakeLMCacheWorker:
    ports = config.controller_monitor_ports
    assert ports is not None
    return FakeLMCacheWorker(
        instance_id, worker_id, ports["pull"], ports["reply"], free_port(), heartbeat_port=ports.get("heartbeat")
    )


@pytest.fixture
def worker(config: KVBusConfig, client: TestClient) -> Iterator[FakeLMCacheWorker]:
    fake = make_worker(config, "lmc-a")
    fake.register()
    yield fake
    fake.close()


def index_size(real_redis: redis.Redis, instance_id: str, worker_id: int = 0) -> int:
    return int(real_redis.hlen(keys.index(instance_id, worker_id, CPU)))


def test_registration_writes_the_same_records_an_agent_writes(
    config: KVBusConfig, client: TestClient, real_redis: redis.Redis
) -> None:
    fake = make_worker(config, "lmc-reg")
    try:
        answer = fake.register()
        ports = config.controller_monitor_ports
        assert ports is not None
        assert answer.extra_config == {"heartbeat_url": f"127.0.0.1:{ports['heartbeat']}"}
        record = WorkerRecord.decode(real_redis.hgetall(keys.worker("lmc-reg", 0)))
        assert record.protocol == WorkerProtocol.LMCACHE and record.port == fake.rep_port and record.ip == "127.0.0.1"
        assert real_redis.sismember(keys.INSTANCES, "lmc-reg") and real_redis.exists(keys.alive("lmc-reg"))
        workers = client.get("/controller/workers", params={"instance_id": "lmc-reg"}).json()["workers"]
        assert [(w["worker_id"], w["port"]) for w in workers] == [(0, fake.rep_port)]
    finally:
        fake.close()


def test_admitted_chunks_land_in_the_ranks_index_and_evictions_leave_it(
    worker: FakeLMCacheWorker, real_redis: redis.Redis
) -> None:
    worker.store(PROMPT)
    wait_for(lambda: index_size(real_redis, "lmc-a") == 3, what="three admitted chunks")
    worker.push_ops([(wire.OpType.EVICT, worker.held[-1])])
    wait_for(lambda: index_size(real_redis, "lmc-a") == 2, what="the evicted chunk gone")


def test_a_clear_reaches_the_worker_over_its_rep_socket_and_answers_as_lmcache(
    worker: FakeLMCacheWorker, client: TestClient, real_redis: redis.Redis
) -> None:
    worker.store(SEED_TOKENS)
    wait_for(lambda: index_size(real_redis, "lmc-a") == 1, what="the seed chunk admitted")
    response = client.post("/clear", json={"instance_id": "lmc-a", "location": CPU})
    assert response.status_code == 200, response.text
    assert response.json()["num_tokens"] == 12 and response.json()["event_id"].startswith("Clear")
    assert isinstance(worker.received[-1], wire.ClearWorkerMsg) and worker.received[-1].location == CPU
    assert index_size(real_redis, "lmc-a") == 0  # the answer waited for the evictions the worker reports after it
    finished = client.post("/check_finish", json={"event_id": response.json()["event_id"]}).json()
    assert finished["status"] == "finished" and finished["workers"]["0"]["num_tokens"] == 12


def test_health_pin_and_compress_with_lmcaches_own_method_pass_through(
    worker: FakeLMCacheWorker, client: TestClient
) -> None:
    health = client.post("/health", json={"instance_id": "lmc-a"})
    assert health.status_code == 200 and health.json()["error_codes"] == {"0": 0}
    pinned = client.post("/pin", json={"instance_id": "lmc-a", "location": CPU, "tokens": SEED_TOKENS})
    assert pinned.status_code == 200 and pinned.json()["num_tokens"] == 12
    sent = worker.received[-1]
    assert isinstance(sent, wire.PinWorkerMsg) and sent.tokens == SEED_TOKENS
    unpinned = client.post("/unpin", json={"instance_id": "lmc-a", "location": CPU, "tokens": SEED_TOKENS})
    assert unpinned.status_code == 400 and "no unpin" in unpinned.json()["detail"]


def test_a_worker_that_answers_an_error_is_a_502_and_check_finish_says_failed(
    worker: FakeLMCacheWorker, client: TestClient
) -> None:
    worker.answer = lambda message: wire.ErrorMsg(error="engine exploded")
    response = client.post("/clear", json={"instance_id": "lmc-a", "location": CPU})
    assert response.status_code == 502 and "engine exploded" in response.json()["detail"]
    status = client.post("/check_finish", json={"event_id": response.json()["event_id"]}).json()
    assert status["status"] == "failed"


def test_a_silent_worker_costs_a_504_not_a_hang_and_the_next_command_still_goes_through(
    worker: FakeLMCacheWorker, client: TestClient
) -> None:
    worker.answer = lambda message: None
    response = client.post("/clear", json={"instance_id": "lmc-a", "location": CPU})
    assert response.status_code == 504 and response.json()["error"] == "agent_timeout"


def test_a_sequence_gap_drops_the_ranks_index_and_the_heartbeat_asks_for_a_full_sync(
    worker: FakeLMCacheWorker, real_redis: redis.Redis
) -> None:
    worker.store(PROMPT[:256])
    wait_for(lambda: index_size(real_redis, "lmc-a") == 1, what="the first chunk")
    worker.store(PROMPT, skip_seq=3)  # three ops lost on the way
    wait_for(
        lambda: LMCacheSync.decode(real_redis.hgetall(keys.lmcache_sync("lmc-a", 0))).gaps == 1, what="the gap noted"
    )
    assert index_size(real_redis, "lmc-a") == 0  # nothing stale is kept
    commands = worker.heartbeat().commands
    assert [c.reason for c in commands] == ["seq_gap"]
    started = worker.ask(
        wire.FullSyncStartMsg(instance_id="lmc-a", worker_id=0, location=CPU, sync_id="s1", total_keys=3, batch_count=2)
    )
    assert isinstance(started, wire.FullSyncStartRetMsg) and started.accepted
    worker.push(
        wire.FullSyncBatchMsg(
            instance_id="lmc-a", worker_id=0, location=CPU, sync_id="s1", batch_id=0, keys=worker.held[:2]
        )
    )
    wait_for(lambda: index_size(real_redis, "lmc-a") == 2, what="the first sync batch")
    status = worker.ask(wire.FullSyncStatusMsg(instance_id="lmc-a", worker_id=0, sync_id="s1"))
    assert isinstance(status, wire.FullSyncStatusRetMsg)
    assert not status.is_complete and status.missing_batches == [1] and not status.can_exit_freeze
    worker.push(
        wire.FullSyncBatchMsg(
            instance_id="lmc-a", worker_id=0, location=CPU, sync_id="s1", batch_id=1, keys=worker.held[2:]
        ),
        wire.FullSyncEndMsg(instance_id="lmc-a", worker_id=0, location=CPU, sync_id="s1", actual_total_keys=3),
    )
    wait_for(lambda: index_size(real_redis, "lmc-a") == 3, what="the whole sync")

    def complete() -> bool:
        answer = worker.ask(wire.FullSyncStatusMsg(instance_id="lmc-a", worker_id=0, sync_id="s1"))
        return isinstance(answer, wire.FullSyncStatusRetMsg) and answer.is_complete and answer.can_exit_freeze

    wait_for(complete, what="the sync complete")
    assert worker.heartbeat().commands == []


def test_a_heartbeat_from_a_worker_redis_lost_registers_it_again_and_asks_for_its_chunks(
    worker: FakeLMCacheWorker, real_redis: redis.Redis
) -> None:
    real_redis.delete(keys.worker("lmc-a", 0))
    assert [c.reason for c in worker.heartbeat().commands] == ["worker_re_registered"]
    assert real_redis.exists(keys.worker("lmc-a", 0))


def test_garbage_on_the_pull_socket_is_skipped_and_the_loop_goes_on(
    worker: FakeLMCacheWorker, real_redis: redis.Redis
) -> None:
    worker._push.send(b"GET / HTTP/1.1\r\n\r\n")
    worker.store(SEED_TOKENS)
    wait_for(lambda: index_size(real_redis, "lmc-a") == 1, what="an admit after the garbage")


def test_deregistration_removes_the_worker_and_its_index(
    worker: FakeLMCacheWorker, client: TestClient, real_redis: redis.Redis
) -> None:
    worker.store(PROMPT)
    wait_for(lambda: index_size(real_redis, "lmc-a") == 3, what="the chunks")
    worker.deregister()
    wait_for(lambda: not real_redis.sismember(keys.INSTANCES, "lmc-a"), what="the instance gone")
    assert index_size(real_redis, "lmc-a") == 0 and not real_redis.exists(keys.worker("lmc-a", 0))
    assert client.post("/clear", json={"instance_id": "lmc-a", "location": CPU}).status_code == 404


def test_lookup_finds_an_lmcache_workers_chunks_with_their_own_hash(
    worker: FakeLMCacheWorker, client: TestClient, real_redis: redis.Redis
) -> None:
    worker.store(PROMPT)
    wait_for(lambda: index_size(real_redis, "lmc-a") == 3, what="three admitted chunks")
    assert client.post("/lookup", json={"tokens": PROMPT}).json()["layout_info"] == {"lmc-a": [CPU, 600]}
    assert client.post("/lookup", json={"tokens": PROMPT[:300]}).json()["layout_info"] == {"lmc-a": [CPU, 256]}
    assert client.post("/lookup", json={"tokens": list(range(7, 20))}).json()["layout_info"] == {}


def test_lmcache_workers_and_kvbus_agents_are_looked_up_side_by_side(
    config: KVBusConfig, worker: FakeLMCacheWorker, client: TestClient, real_redis: redis.Redis
) -> None:
    from kvbus.agent.agent import Agent
    from kvbus.agent.synthetic import synthetic_kv
    from tests.conftest import MODEL

    agent = Agent(config.with_overrides(lmcache_instance_id="kvbus-b", chunk_size=256), model=MODEL)
    agent.start()
    try:
        agent.tiers.store(PROMPT[:512], synthetic_kv(agent.space, PROMPT[:512]))
        worker.store(PROMPT)
        wait_for(lambda: index_size(real_redis, "lmc-a") == 3, what="the LMCache worker's chunks")
        wait_for(lambda: index_size(real_redis, "kvbus-b") == 2, what="the agent's chunks")
        layout = client.post("/lookup", json={"tokens": PROMPT}).json()["layout_info"]
        assert layout == {"lmc-a": [CPU, 600], "kvbus-b": [CPU, 512]}
        assert list(layout) == ["lmc-a", "kvbus-b"]  # longest first
        assert client.post("/clear", json={"instance_id": "kvbus-b", "location": CPU}).json()["num_tokens"] == 512
        assert client.post("/lookup", json={"tokens": PROMPT}).json()["layout_info"] == {"lmc-a": [CPU, 600]}
    finally:
        agent.stop()


def test_two_lmcache_ranks_of_one_instance_are_credited_with_what_both_hold(
    config: KVBusConfig, client: TestClient, real_redis: redis.Redis
) -> None:
    ranks = [make_worker(config, "lmc-tp", n) for n in (0, 1)]
    try:
        for rank in ranks:
            rank.register()
        ranks[0].store(PROMPT)
        ranks[1].store(PROMPT[:256])
        wait_for(lambda: index_size(real_redis, "lmc-tp", 1) == 1, what="rank 1's chunk")
        wait_for(lambda: index_size(real_redis, "lmc-tp", 0) == 3, what="rank 0's chunks")
        assert client.post("/lookup", json={"tokens": PROMPT}).json()["layout_info"] == {"lmc-tp": [CPU, 256]}
        cleared = client.post("/clear", json={"instance_id": "lmc-tp", "location": CPU})
        assert cleared.status_code == 200
        assert cleared.json()["num_tokens"] == 256 and cleared.json()["num_tokens_per_worker"] == {"0": 600, "1": 256}
        assert all(isinstance(rank.received[-1], wire.ClearWorkerMsg) for rank in ranks)
    finally:
        for rank in ranks:
            rank.close()


def test_lmcaches_own_gauges_count_this_processs_messages_and_the_fleets_gaps(
    worker: FakeLMCacheWorker, client: TestClient, real_redis: redis.Redis
) -> None:
    worker.store(PROMPT[:256])
    worker.store(PROMPT, skip_seq=2)
    wait_for(
        lambda: LMCacheSync.decode(real_redis.hgetall(keys.lmcache_sync("lmc-a", 0))).gaps == 1, what="the gap noted"
    )
    worker.heartbeat()  # /metrics shows the fleet as of each worker's last heartbeat
    text = client.get("/metrics").text
    values = {
        line.split("{", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lmcache:cache_controller_")
    }
    prefix = "lmcache:cache_controller_"
    assert values[prefix + "kv_op_seq_discontinuity_count"] == 1
    assert values[prefix + "pull_socket_message_count"] == 2 and values[prefix + "reply_socket_message_count"] == 1
    assert values[prefix + "registered_workers_count"] == 1


def test_the_hash_space_follows_the_engines_seed_unless_told_outright() -> None:
    from kvbus.controller.lmcache.bridge import hash_space
    from kvbus.shared.hashing import vllm_none_hash

    base = KVBusConfig()
    assert hash_space(base, environ={}).none_hash == 0  # engines without vLLM
    assert hash_space(base, environ={"PYTHONHASHSEED": "123"}).none_hash == vllm_none_hash(123)
    assert hash_space(base.with_overrides(lmcache_hash_seed=7), environ={}).none_hash == vllm_none_hash(7)
    told = base.with_overrides(lmcache_none_hash=0)
    assert hash_space(told, environ={"PYTHONHASHSEED": "123"}).none_hash == 0


def test_a_taken_monitor_port_fails_the_start_naming_it_and_leaves_nothing_bound(redis_url: str) -> None:
    import socket

    from kvbus.controller.app import create_app

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    pull = free_port()
    ports = {"pull": pull, "reply": taken.getsockname()[1]}
    try:
        with (
            pytest.raises(OSError, match="reply socket"),
            TestClient(create_app(KVBusConfig(redis_url=redis_url, controller_monitor_ports=ports))),
        ):
            pass
        with socket.socket() as again:
            again.bind(("127.0.0.1", pull))  # the pull port it had bound is free again
    finally:
        taken.close()


def test_an_lmcache_worker_with_an_id_no_instance_may_have_is_not_registered(
    config: KVBusConfig, client: TestClient, real_redis: redis.Redis
) -> None:
    import zmq

    fake = FakeLMCacheWorker("../<b>", 0, *_ports(config), free_port())
    try:
        with pytest.raises(zmq.Again):  # no answer: the controller logged and skipped it
            fake._dealer.setsockopt(zmq.RCVTIMEO, 1000)
            fake.register()
        assert not real_redis.sismember(keys.INSTANCES, "../<b>")
    finally:
        fake.close()


def _ports(config: KVBusConfig) -> tuple[int, int]:
    ports = config.controller_monitor_ports
    assert ports is not None
    return ports["pull"], ports["reply"]


def test_lmcache_workers_of_instances_on_different_masters_each_get_their_commands(
    config: KVBusConfig, client: TestClient, real_redis: redis.Redis
) -> None:
    # Each instance's stream is in a slot of its own: on a cluster, one read cannot name them together.
    ids = on_distinct_masters(real_redis, 3)
    fakes = [make_worker(config, instance_id) for instance_id in ids]
    try:
        for fake in fakes:
            fake.register()
            fake.store(SEED_TOKENS)
        wait_for(lambda: all(index_size(real_redis, i) == 1 for i in ids), what="each instance's chunk")
        for fake, instance_id in zip(fakes, ids, strict=True):
            cleared = client.post("/clear", json={"instance_id": instance_id, "location": CPU})
            assert cleared.status_code == 200, cleared.text
            assert cleared.json()["num_tokens"] == 12
            assert isinstance(fake.received[-1], wire.ClearWorkerMsg)
    finally:
        for fake in fakes:
            fake.close()
