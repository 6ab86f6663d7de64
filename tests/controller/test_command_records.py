"""/check_finish's reading of command records (command_records.py): `describe()` on records built here,
`check()` against a real redis-server, then the endpoint with real agents."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient

from kvbus.agent.agent import Agent
from kvbus.controller import command_records, event_ids
from kvbus.controller.answers import CheckFinishAnswer, CommandStatus, WorkerOutcome
from kvbus.controller.app import create_app
from kvbus.controller.errors import UnknownEvent
from kvbus.controller.event_ids import Operation
from kvbus.shared import keys, redis_conn
from kvbus.shared.config import KVBusConfig
from kvbus.shared.flat_fields import encode
from kvbus.shared.messages import CommandKind, Result, ResultStatus
from kvbus.shared.records import CommandRecord, RecordedResult
from tests.conftest import MODEL, SEED_TOKENS, wait_for
from tests.controller.conftest import CheckedClient
from tests.controller.test_routes import BASE, CPU, INSTANCE, post, store

# One suite for both deployments: each test runs on one Redis and on a 3-master Redis Cluster.
REDIS_BACKENDS = ("single", "cluster")

SENT_MS = 1_700_000_000_000  # the command's stream entry id, in Redis server time
TIMEOUT_MS = 500
GIVEN_UP_MS = SENT_MS + TIMEOUT_MS + 2000  # answers.py: unanswered 2 s past the deadline is expired
EVENT = "Clear-under-test"


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


def record(*answers: tuple[int, ResultStatus], workers: tuple[int, ...] = (0, 1)) -> CommandRecord:
    """A clear sent to `workers` at SENT_MS, with each (worker, status) in `answers` answered, 10 tokens each."""
    return CommandRecord(
        kind=CommandKind.CLEAR,
        instance_id=INSTANCE,
        deadline_ms=SENT_MS + TIMEOUT_MS,
        workers=list(workers),
        results={worker: RecordedResult(status=status, num_tokens=10) for worker, status in answers},
    )


def statuses(answer: CheckFinishAnswer) -> tuple[CommandStatus, dict[str, str]]:
    assert isinstance(answer.workers, dict)
    return answer.status, {worker: outcome.status for worker, outcome in answer.workers.items()}


def test_a_command_nobody_answered_yet_is_pending_with_what_it_was() -> None:
    assert command_records.describe(EVENT, record(), SENT_MS + 1) == CheckFinishAnswer(
        event_id=EVENT,
        status=CommandStatus.PENDING,
        kind="clear",
        instance_id=INSTANCE,
        workers={"0": WorkerOutcome(status="pending"), "1": WorkerOutcome(status="pending")},
    )


@pytest.mark.parametrize(
    ("now_ms", "status"),
    [
        (SENT_MS + TIMEOUT_MS + 1, CommandStatus.PENDING),  # past the deadline, the answer may still be on its way
        (GIVEN_UP_MS, CommandStatus.PENDING),
        (GIVEN_UP_MS + 1, CommandStatus.EXPIRED),
    ],
)
def test_a_worker_still_silent_past_deadline_and_grace_makes_it_expired(now_ms: int, status: CommandStatus) -> None:
    answered = record((0, ResultStatus.OK))
    assert statuses(command_records.describe(EVENT, answered, now_ms)) == (status, {"0": "ok", "1": "pending"})


@pytest.mark.parametrize("now_ms", [SENT_MS, GIVEN_UP_MS + 60_000])
def test_a_command_every_worker_answered_is_finished_whenever_it_is_read(now_ms: int) -> None:
    answer = command_records.describe(EVENT, record((1, ResultStatus.OK), (0, ResultStatus.OK)), now_ms)
    assert answer.status == CommandStatus.FINISHED
    counted = WorkerOutcome(status="ok", num_tokens=10, error_code=0, detail="")
    assert answer.workers == {"0": counted, "1": counted}


@pytest.mark.parametrize("failure", [ResultStatus.ERROR, ResultStatus.REFUSED])
@pytest.mark.parametrize("now_ms", [SENT_MS, GIVEN_UP_MS + 1])
def test_one_error_or_refusal_fails_the_command_even_with_a_worker_left_or_past_the_grace(
    failure: ResultStatus, now_ms: int
) -> None:
    failed = record((0, failure))
    assert statuses(command_records.describe(EVENT, failed, now_ms)) == (
        CommandStatus.FAILED,
        {"0": str(failure), "1": "pending"},
    )
    with_expired = record((0, ResultStatus.EXPIRED), (1, failure))
    assert command_records.describe(EVENT, with_expired, now_ms).status == CommandStatus.FAILED


def test_a_worker_that_got_it_too_late_makes_it_expired_before_the_deadline_passes() -> None:
    late = record((0, ResultStatus.OK), (1, ResultStatus.EXPIRED))
    assert statuses(command_records.describe(EVENT, late, SENT_MS)) == (
        CommandStatus.EXPIRED,
        {"0": "ok", "1": "expired"},
    )


def test_a_result_from_a_worker_the_command_was_not_sent_to_is_ignored() -> None:
    stray = record((0, ResultStatus.OK), (5, ResultStatus.ERROR), workers=(0,))
    assert statuses(command_records.describe(EVENT, stray, SENT_MS)) == (CommandStatus.FINISHED, {"0": "ok"})


def test_a_worker_outcome_carries_its_code_and_reason() -> None:
    assert command_records.outcome(None) == WorkerOutcome(status="pending")
    said = RecordedResult(status=ResultStatus.OK, error_code=-1, detail="memory check failed")
    assert command_records.outcome(said) == WorkerOutcome(
        status="ok", num_tokens=0, error_code=-1, detail="memory check failed"
    )


def _check(url: str, event_id: str) -> CheckFinishAnswer:
    async def once() -> CheckFinishAnswer:
        client = await redis_conn.connect_async(url)
        try:
            return await command_records.check(client, event_id)
        finally:
            await client.aclose()

    return asyncio.run(once())


@pytest.mark.parametrize("operation", [Operation.LOOKUP, Operation.QUERY_WORKER_INFO, Operation.QUERY_INSTANCE])
def test_lookups_and_queries_are_finished_by_their_id_alone(redis_url: str, operation: Operation) -> None:
    event_id = event_ids.new(operation)
    assert _check(redis_url, event_id) == CheckFinishAnswer(event_id=event_id, status=CommandStatus.FINISHED)


@pytest.mark.parametrize(
    "event_id",
    [event_ids.new(Operation.CLEAR), "Lookup-not-a-uuid", "nothing"],
    ids=["command-never-sent", "lookup-shaped", "no-operation"],
)
def test_an_id_with_no_record_that_no_lookup_or_query_made_is_unknown(redis_url: str, event_id: str) -> None:
    with pytest.raises(UnknownEvent, match="never created, or it is older than event_retention or") as raised:
        _check(redis_url, event_id)
    assert raised.value.context == {"event_id": event_id}


@pytest.mark.parametrize(
    ("entry_ms", "status"), [(1, CommandStatus.EXPIRED), (4_102_444_800_000, CommandStatus.PENDING)]
)
def test_check_reads_the_record_as_of_redis_time(
    redis_url: str, real_redis: redis.Redis, entry_ms: int, status: CommandStatus
) -> None:
    sent = CommandRecord(kind=CommandKind.PIN, instance_id=INSTANCE, deadline_ms=entry_ms + TIMEOUT_MS, workers=[0, 1])
    real_redis.hset(keys.command_record(EVENT), mapping=encode(sent))
    answered = Result(event_id=EVENT, instance_id=INSTANCE, worker_id=1, status=ResultStatus.OK, num_tokens=3)
    # As the agent writes its result: one field per worker.
    real_redis.hset(keys.command_record(EVENT), CommandRecord.result_field(1), CommandRecord.result_value(answered))
    checked = _check(redis_url, EVENT)
    assert (checked.kind, checked.instance_id) == ("pin", INSTANCE)
    assert statuses(checked) == (status, {"0": "pending", "1": "ok"})
    assert isinstance(checked.workers, dict) and checked.workers["1"].num_tokens == 3


def test_check_finish_of_unknown_lookup_and_malformed_events(client: TestClient) -> None:
    missing = post(client, "/check_finish", {"event_id": "Clear-nothing"}, status=404)
    assert missing["error"] == "unknown_event" and missing["event_id"] == "Clear-nothing"
    looked = post(client, "/lookup", {"tokens": SEED_TOKENS})
    assert post(client, "/check_finish", {"event_id": looked["event_id"]})["status"] == "finished"
    assert post(client, "/check_finish", {}, status=422)["field"] == "event_id"
    assert post(client, "/check_finish", {"event_id": 7}, status=422)["field"] == "event_id"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/pin", {**CPU, "tokens": [1]}),
        ("/unpin", {**CPU, "tokens": [1]}),
        ("/compress", {**CPU, "method": "zlib"}),
        ("/decompress", {**CPU, "method": "zlib"}),
        (
            "/move",
            {
                "old_position": [INSTANCE, "LocalCPUBackend"],
                "new_position": [INSTANCE, "LocalDiskBackend"],
                "tokens": [1],
            },
        ),
        ("/health", {"instance_id": INSTANCE}),
        ("/clear", CPU),
    ],
)
def test_every_command_gives_504_on_a_silent_agent_then_check_finish_expires(
    client: TestClient, silent: Agent, path: str, body: dict[str, Any]
) -> None:
    answer = post(client, path, body, status=504)
    assert post(client, "/check_finish", {"event_id": answer["event_id"]})["status"] == "pending"
    wait_for(
        lambda: post(client, "/check_finish", {"event_id": answer["event_id"]})["status"] == "expired",
        timeout=10,
        what="the event to expire",
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_command_record_costs_at_most_250_bytes(
    redis_url: str, real_redis: redis.Redis, workers: int, redis_backend: str
) -> None:
    """Records lived an hour at about 300 B (360 B with two ranks): they held the location, the timeout,
    the stream entry id and each result as a JSON object with its field names. A cluster node keeps
    some bookkeeping of its own per key, which MEMORY USAGE counts."""
    config = BASE.with_overrides(redis_url=redis_url, lmcache_instance_id="lmcache_default_instance")
    agents = [Agent(config, model=MODEL, worker_id=rank) for rank in range(workers)]
    for running in agents:
        running.start()
    try:
        with CheckedClient(create_app(config)) as client:
            for running in agents:
                store(running, SEED_TOKENS)
            answer = post(client, "/clear", {"instance_id": "lmcache_default_instance", "location": "LocalCPUBackend"})
            assert answer["num_tokens"] == 12
            assert post(client, "/check_finish", {"event_id": answer["event_id"]})["status"] == "finished"
    finally:
        for running in agents:
            running.stop()
    key = keys.command_record(answer["event_id"])
    assert set(real_redis.hkeys(key)) == {"kind", "instance_id", "deadline_ms", "workers", *map(str, range(workers))}
    assert real_redis.memory_usage(key, samples=0) <= (250 if redis_backend == "single" else 280)


def _by_shard(event_ids: list[str]) -> dict[int, list[str]]:
    shards: dict[int, list[str]] = {}
    for event_id in event_ids:
        shards.setdefault(keys.command_shard(event_id), []).append(event_id)
    return shards


def test_retention_is_bounded_by_count_the_oldest_records_of_each_shard_going_first(
    redis_url: str, real_redis: redis.Redis, agent: Agent
) -> None:
    """Records are spread over COMMAND_SHARDS shards (so no one cluster slot takes every command), each
    keeping its share of event_retention_count: here 2 a shard."""
    config = BASE.with_overrides(redis_url=redis_url, event_retention_count=2 * keys.COMMAND_SHARDS)
    with CheckedClient(create_app(config)) as client:
        sent = [post(client, "/clear", CPU)["event_id"] for _ in range(3 * keys.COMMAND_SHARDS)]
        shards = _by_shard(sent)
        kept = [event_id for ids in shards.values() for event_id in ids[-2:]]
        for event_id in sent:
            if event_id in kept:
                assert post(client, "/check_finish", {"event_id": event_id})["status"] == "finished"
            else:
                gone = post(client, "/check_finish", {"event_id": event_id}, status=404)
                assert "event_retention_count" in gone["detail"]
    assert any(len(ids) > 2 for ids in shards.values())  # some shard dropped records
    for shard, ids in shards.items():
        assert real_redis.lrange(keys.command_records(shard), 0, -1) == ids[-2:]
    assert sorted(real_redis.scan_iter("kvbus:*:command:*")) == sorted(map(keys.command_record, kept))


def test_the_ids_of_records_that_expired_leave_the_list_as_new_commands_come(
    redis_url: str, real_redis: redis.Redis, agent: Agent
) -> None:
    with CheckedClient(create_app(BASE.with_overrides(redis_url=redis_url, event_retention=0.3))) as client:
        old = _by_shard([post(client, "/clear", CPU)["event_id"] for _ in range(4)])
        wait_for(lambda: not any(real_redis.scan_iter("*:command:*")), what="the records to expire")
    # The newer records are kept long, so that none of them expires while the others are sent.
    with CheckedClient(create_app(BASE.with_overrides(redis_url=redis_url))) as client:
        # Each send drops up to two expired ids of its own shard: send until every shard had its chance.
        newer: dict[int, list[str]] = {}
        for _ in range(50 * keys.COMMAND_SHARDS):
            if all(2 * len(newer.get(shard, [])) >= len(ids) for shard, ids in old.items()):
                break
            event_id = post(client, "/clear", CPU)["event_id"]
            newer.setdefault(keys.command_shard(event_id), []).append(event_id)
    for shard in old:
        assert real_redis.lrange(keys.command_records(shard), 0, -1) == newer[shard]


def test_a_result_written_after_its_record_was_dropped_is_an_unknown_event_not_a_500(
    redis_url: str, real_redis: redis.Redis
) -> None:
    answered = Result(event_id=EVENT, instance_id=INSTANCE, worker_id=0, status=ResultStatus.OK, num_tokens=3)
    # What replies.py leaves when the record it answers into is gone: the result alone, with a TTL.
    real_redis.hset(keys.command_record(EVENT), CommandRecord.result_field(0), CommandRecord.result_value(answered))
    with pytest.raises(UnknownEvent):
        _check(redis_url, EVENT)
