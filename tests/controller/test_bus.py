"""The command bus (bus.py) against a real redis-server: `CommandBus` driven directly, with real agents or with
workers simulated on the command stream, then the tensor-parallel fan-out as the HTTP commands show it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
from starlette.testclient import TestClient

from kvbus.agent.agent import Agent
from kvbus.controller import bus as bus_module
from kvbus.controller import event_ids
from kvbus.controller.bus import NOT_SENT, RESULTS_TTL_S, CommandBus, Outcome
from kvbus.controller.errors import AgentTimeout, UnknownInstance
from kvbus.controller.event_ids import Operation
from kvbus.shared import keys, redis_conn
from kvbus.shared.config import KVBusConfig
from kvbus.shared.flat_fields import decode, encode
from kvbus.shared.messages import Command, CommandKind, Result, ResultStatus
from kvbus.shared.records import (
    CommandRecord,
    JournaledCommand,
    JournaledResult,
    RecordedResult,
    Working,
    decode_journal,
    decode_result,
)
from tests.conftest import MODEL, SEED_TOKENS, RedisServer, free_port, wait_for
from tests.controller.test_lookup import hold
from tests.controller.test_routes import BASE, INSTANCE, PROMPT, post, store

# One suite for both deployments: each test runs on one Redis and on a 3-master Redis Cluster.
REDIS_BACKENDS = ("single", "cluster")

LOCATION = "LocalCPUBackend"


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


@contextlib.asynccontextmanager
async def command_bus(url: str, timeout_s: float) -> AsyncIterator[CommandBus]:
    client = await redis_conn.connect_async(url)
    reader = await redis_conn.connect_async(url, blocking=True)
    bus = CommandBus(client, reader, timeout_s=timeout_s)
    await bus.start()
    try:
        yield bus
    finally:
        await bus.stop()
        await client.aclose()
        await reader.aclose()


def enlist(client: redis.Redis, instance_id: str, *worker_ids: int, heartbeat: bool = True) -> None:
    """Workers as the bus sees them: in the instance's workers set, each with its group on the command stream."""
    for worker_id in worker_ids:
        client.sadd(keys.workers(instance_id), worker_id)
        client.xgroup_create(keys.commands(instance_id), keys.command_group(worker_id), id="0", mkstream=True)
    if heartbeat:
        client.set(keys.alive(instance_id), worker_ids[0], ex=60)


async def answer(url: str, instance_id: str, worker_id: int, num_tokens: int) -> tuple[str, Command]:
    """As the worker: read its next command through its group and reply where it says; returns its entry id and it."""
    client = await redis_conn.connect_async(url, blocking=True)
    group = keys.command_group(worker_id)
    try:
        [(_, [(entry_id, fields)])] = await client.xreadgroup(
            group, group, {keys.commands(instance_id): ">"}, count=1, block=5000
        )
        command = decode(Command, fields)
        result = Result(
            event_id=command.event_id,
            instance_id=instance_id,
            worker_id=worker_id,
            status=ResultStatus.OK,
            num_tokens=num_tokens,
        )
        await client.xadd(command.reply_to, encode(result), nomkstream=True)  # as agents answer
        await client.xack(keys.commands(instance_id), group, entry_id)
        return entry_id, command
    finally:
        await client.aclose()


@pytest.mark.parametrize("workers", [False, True], ids=["nothing-registered", "workers-without-a-stream"])
def test_an_unknown_instance_raises_and_writes_nothing(redis_url: str, real_redis: redis.Redis, workers: bool) -> None:
    if workers:
        real_redis.sadd(keys.workers("ghost"), 0)  # a deregistering instance: its stream is already gone
    event_id = event_ids.new(Operation.CLEAR)

    async def send() -> Outcome:
        async with command_bus(redis_url, timeout_s=0.5) as bus:
            return await bus.request("ghost", CommandKind.CLEAR, event_id, location=LOCATION)

    with pytest.raises(UnknownInstance, match="unknown instance_id 'ghost'"):
        asyncio.run(send())
    assert real_redis.exists(keys.command_record(event_id), keys.commands("ghost"), keys.JOURNAL) == 0


def test_the_outcome_waits_for_every_worker_and_lists_them_in_order(redis_url: str, real_redis: redis.Redis) -> None:
    enlist(real_redis, INSTANCE, 0, 1, 2)
    event_id = event_ids.new(Operation.CLEAR)

    async def scenario() -> Outcome:
        async with command_bus(redis_url, timeout_s=5) as bus:
            request = asyncio.create_task(bus.request(INSTANCE, CommandKind.CLEAR, event_id, location=LOCATION))
            for worker_id in (2, 0, 1):  # out of order: the outcome still lists them by worker id
                await answer(redis_url, INSTANCE, worker_id, num_tokens=100 * worker_id)
            return await request

    outcome = asyncio.run(scenario())
    assert (outcome.event_id, outcome.instance_id) == (event_id, INSTANCE)
    assert list(outcome.results) == [0, 1, 2]
    assert {w: (r.status, r.num_tokens) for w, r in outcome.results.items()} == {
        0: ("ok", 0),
        1: ("ok", 100),
        2: ("ok", 200),
    }


def test_a_silent_worker_times_out_named_with_the_state_of_its_heartbeat(
    redis_url: str, real_redis: redis.Redis
) -> None:
    enlist(real_redis, INSTANCE, 0, 1)
    event_id = event_ids.new(Operation.CLEAR)

    async def scenario() -> Outcome:
        async with command_bus(redis_url, timeout_s=0.5) as bus:
            request = asyncio.create_task(bus.request(INSTANCE, CommandKind.CLEAR, event_id, location=LOCATION))
            await answer(redis_url, INSTANCE, 0, num_tokens=12)
            return await request

    with pytest.raises(AgentTimeout) as raised:
        asyncio.run(scenario())
    # Worker 0's answer arrived, and still the outcome waited for worker 1.
    assert raised.value.detail == (
        f"worker 1 of {INSTANCE!r} did not answer within 0.5 s (workers [0] answered); "
        "its heartbeat is fresh, so it is alive but busy or stuck"
    )
    assert raised.value.context == {"event_id": event_id}


def test_a_command_to_an_instance_without_heartbeat_is_refused_at_once_and_never_queued(
    redis_url: str, real_redis: redis.Redis
) -> None:
    """It waited the whole command_timeout for a 504 that said the instance had no heartbeat, and the command
    stayed on the stream, to run whenever the instance came back."""
    enlist(real_redis, INSTANCE, 0, 1, heartbeat=False)
    event_id = event_ids.new(Operation.CLEAR)

    async def send() -> Outcome:
        async with command_bus(redis_url, timeout_s=5) as bus:
            return await bus.request(INSTANCE, CommandKind.CLEAR, event_id, location=LOCATION)

    started = time.monotonic()
    with pytest.raises(AgentTimeout) as raised:
        asyncio.run(send())
    assert time.monotonic() - started < 1.0  # the bus's own start and stop included; the timeout is 5 s
    assert raised.value.detail == (
        f"the command was not sent: {INSTANCE!r} (workers 0, 1) has no heartbeat, so its engine is down or "
        "cannot reach Redis; it is not queued to run when the instance returns"
    )
    assert raised.value.context == {"event_id": event_id}
    assert real_redis.xlen(keys.commands(INSTANCE)) == 0
    # /check_finish knows it: each worker's outcome is expired, saying why.
    record = CommandRecord.decode(real_redis.hgetall(keys.command_record(event_id)))
    assert record.workers == [0, 1] and record.kind == CommandKind.CLEAR
    unsent = RecordedResult(status=ResultStatus.EXPIRED, detail=NOT_SENT)
    assert record.results == {0: unsent, 1: unsent}
    [(_, journaled)] = real_redis.xrange(keys.JOURNAL)
    assert decode_journal(journaled) == JournaledCommand(
        event_id=event_id, instance_id=INSTANCE, kind=CommandKind.CLEAR, location=LOCATION
    )


def test_a_command_to_a_lapsed_instance_is_504_at_once_and_check_finish_says_expired(
    client: TestClient, redis_url: str
) -> None:
    hold(redis_url, "lapsed", SEED_TOKENS, alive=False)  # registered and holding, its heartbeat expired
    redis_conn.connect(redis_url).xgroup_create(keys.commands("lapsed"), "worker-0", mkstream=True)
    started = time.monotonic()
    body = post(client, "/clear", {"instance_id": "lapsed", "location": LOCATION}, status=504)
    assert time.monotonic() - started < 0.25  # command_timeout is 0.5 s here
    assert body["error"] == "agent_timeout" and "has no heartbeat" in body["detail"]
    assert post(client, "/check_finish", {"event_id": body["event_id"]}) == {
        "event_id": body["event_id"],
        "status": "expired",
        "kind": "clear",
        "instance_id": "lapsed",
        "workers": {"0": {"status": "expired", "num_tokens": 0, "error_code": 0, "detail": NOT_SENT}},
    }


def test_the_command_record_and_the_journal_entry_go_out_with_the_command(
    redis_url: str, real_redis: redis.Redis
) -> None:
    enlist(real_redis, INSTANCE, 0, 1)
    event_id = event_ids.new(Operation.PIN)

    async def scenario() -> tuple[str, list[tuple[str, Command]]]:
        async with command_bus(redis_url, timeout_s=5) as bus:
            request = asyncio.create_task(
                bus.request(INSTANCE, CommandKind.PIN, event_id, location=LOCATION, tokens=PROMPT)
            )
            read = [await answer(redis_url, INSTANCE, worker_id, num_tokens=512) for worker_id in (0, 1)]
            await request
            return bus.results_key, read

    results_key, [(entry_id, command), (same_entry, _)] = asyncio.run(scenario())
    assert same_entry == entry_id  # one stream entry, read by each worker's own group
    assert command == Command(
        event_id=event_id, kind=CommandKind.PIN, reply_to=results_key, timeout_ms=5000, location=LOCATION, tokens=PROMPT
    )
    record = CommandRecord.decode(real_redis.hgetall(keys.command_record(event_id)))
    sent_ms = int(entry_id.split("-")[0])  # the deadline counts from the entry id, Redis server time
    assert record == CommandRecord(
        kind=CommandKind.PIN, instance_id=INSTANCE, deadline_ms=sent_ms + 5000, workers=[0, 1]
    )
    assert 0 < real_redis.pttl(keys.command_record(event_id)) <= 3600 * 1000  # the bus's event retention
    [(_, journaled)] = real_redis.xrange(keys.JOURNAL)  # the simulated workers journal nothing
    assert decode_journal(journaled) == JournaledCommand(
        event_id=event_id, instance_id=INSTANCE, kind=CommandKind.PIN, location=LOCATION, tokens=len(PROMPT)
    )


def test_real_ranks_answer_into_the_record_and_the_journal(
    redis_url: str, real_redis: redis.Redis, ranks: list[Agent]
) -> None:
    store(ranks[0], PROMPT)
    store(ranks[1], PROMPT[:512])
    event_id = event_ids.new(Operation.CLEAR)

    async def clear() -> Outcome:
        async with command_bus(redis_url, timeout_s=5) as bus:
            return await bus.request(INSTANCE, CommandKind.CLEAR, event_id, location=LOCATION)

    outcome = asyncio.run(clear())
    assert {w: r.num_tokens for w, r in outcome.results.items()} == {0: 600, 1: 512}
    # Each worker writes its result into the record before it replies.
    record = CommandRecord.decode(real_redis.hgetall(keys.command_record(event_id)))
    assert record.results == {w: RecordedResult.of(r) for w, r in outcome.results.items()}
    journal = [decode_journal(fields) for _, fields in real_redis.xrange(keys.JOURNAL)]
    mine = [entry for entry in journal if entry.event_id == event_id]
    # The command's entry is written while the workers run it, so it may follow their results.
    [command] = [e for e in mine if isinstance(e, JournaledCommand)]
    assert command.kind == CommandKind.CLEAR
    assert sorted((e.worker_id, e.num_tokens) for e in mine if isinstance(e, JournaledResult)) == [
        (0, 600),
        (1, 512),
    ]
    assert len(mine) == 3


def test_the_result_stream_lives_as_long_as_the_bus_and_skips_what_it_cannot_use(
    redis_url: str, real_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    enlist(real_redis, INSTANCE, 0)
    event_id = event_ids.new(Operation.CLEAR)

    async def scenario() -> tuple[str, Outcome]:
        async with command_bus(redis_url, timeout_s=5) as bus:
            [(_, opening)] = real_redis.xrange(bus.results_key)
            assert decode_result(opening) is None  # the entry that created the stream
            assert 0 < real_redis.ttl(bus.results_key) <= RESULTS_TTL_S  # it expires if this controller dies
            real_redis.xadd(bus.results_key, {"event_id": event_id, "worker_id": "not a number"})
            stray = Result(event_id="Clear-nobody-waits", instance_id=INSTANCE, worker_id=0, status=ResultStatus.OK)
            real_redis.xadd(bus.results_key, encode(stray))
            request = asyncio.create_task(bus.request(INSTANCE, CommandKind.CLEAR, event_id, location=LOCATION))
            await answer(redis_url, INSTANCE, 0, num_tokens=7)
            return bus.results_key, await request

    with caplog.at_level(logging.ERROR, logger="kvbus.controller.bus"):
        results_key, outcome = asyncio.run(scenario())
    assert outcome.results[0].num_tokens == 7
    assert "ignoring undecodable result" in caplog.text
    assert not real_redis.exists(results_key)  # stop() removes it at once


def test_a_clear_reaches_every_rank_and_reports_their_disagreement(client: TestClient, ranks: list[Agent]) -> None:
    store(ranks[0], PROMPT)
    store(ranks[1], PROMPT[:512])
    answer = post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"})
    assert answer["num_tokens"] == 512
    assert answer["num_tokens_per_worker"] == {"0": 600, "1": 512}
    assert ranks[0].tiers.contains(PROMPT) == 0 and ranks[1].tiers.contains(PROMPT) == 0
    finished = post(client, "/check_finish", {"event_id": answer["event_id"]})
    assert finished["status"] == "finished" and finished["kind"] == "clear" and finished["instance_id"] == INSTANCE
    assert {w: r["num_tokens"] for w, r in finished["workers"].items()} == {"0": 600, "1": 512}


def test_ranks_that_agree_answer_exactly_as_lmcache(client: TestClient, ranks: list[Agent]) -> None:
    for agent in ranks:
        store(agent, SEED_TOKENS)
    assert post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"}).keys() == {
        "event_id",
        "num_tokens",
    }


def test_a_silent_rank_gives_504_naming_it_and_check_finish_tells_the_outcome_later(
    client: TestClient, config: KVBusConfig
) -> None:
    live = Agent(config, model=MODEL, worker_id=0)
    live.start()
    late = Agent(config, model=MODEL, worker_id=1)
    late.registration.register()
    late.consumer.ensure_group()
    try:
        body = post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"}, status=504)
        assert body["error"] == "agent_timeout" and "worker 1 of 'tp-instance' did not answer" in body["detail"]
        assert "workers [0] answered" in body["detail"]
        event_id = body["event_id"]
        pending = post(client, "/check_finish", {"event_id": event_id})
        assert pending["status"] == "pending" and pending["workers"]["1"] == {"status": "pending"}
        assert pending["workers"]["0"]["status"] == "ok"
        late.start()  # reads the command past its deadline: answers it expired, does nothing
        wait_for(
            lambda: post(client, "/check_finish", {"event_id": event_id})["workers"]["1"]["status"] == "expired",
            what="the late rank's answer",
        )
        assert post(client, "/check_finish", {"event_id": event_id})["status"] == "expired"
    finally:
        live.stop()
        late.stop()


def test_commands_and_results_are_journaled(client: TestClient, ranks: list[Agent], redis_url: str) -> None:
    event_id = post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"})["event_id"]
    journal = redis_conn.connect(redis_url).xrange(keys.JOURNAL)
    mine = [fields for _, fields in journal if fields.get("event_id") == event_id]
    # The command is journaled while its workers run it: its entry may come before or after their results.
    [command] = [f for f in mine if f["type"] == "command"]
    assert command["instance_id"] == INSTANCE and command["kind"] == "clear"
    assert sorted(f["worker_id"] for f in mine if f["type"] == "result") == ["0", "1"]
    assert len(mine) == 3


def test_a_rank_that_stops_leaves_the_instance_to_the_others(client: TestClient, config: KVBusConfig) -> None:
    first, second = (Agent(config, model=MODEL, worker_id=rank) for rank in (0, 1))
    first.start()
    second.start()
    store(first, SEED_TOKENS)
    second.stop()
    assert post(client, "/lookup", {"tokens": SEED_TOKENS})["layout_info"] == {INSTANCE: ["LocalCPUBackend", 12]}
    answer = post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"})
    assert answer == {"event_id": answer["event_id"], "num_tokens": 12}
    first.stop()
    assert post(client, "/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"}, status=404)
    assert client.get("/controller/key-stats").json()["total_instance_count"] == 0


def test_clear_of_an_unknown_instance_is_404(client: TestClient) -> None:
    response = client.post("/clear", json={"instance_id": "ghost", "location": "LocalCPUBackend"})
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_instance"
    assert "ghost" in response.json()["detail"]


def test_clear_of_a_silent_instance_is_504_with_the_event_id(
    client: TestClient,
    redis_url: str,
) -> None:
    hold(redis_url, "silent", SEED_TOKENS)
    redis_conn.connect(redis_url).xgroup_create(keys.commands("silent"), "worker-0", mkstream=True)
    response = client.post("/clear", json={"instance_id": "silent", "location": "LocalCPUBackend"})
    assert response.status_code == 504
    body = response.json()
    assert body["error"] == "agent_timeout" and body["event_id"].startswith("Clear")
    assert "did not answer within 0.5 s" in body["detail"]


def test_an_agent_failure_is_502_with_the_event_id(
    client: TestClient,
    agent: Agent,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> int:
        raise OSError("device lost")

    monkeypatch.setattr(agent.backends[0], "clear", broken)
    response = client.post("/clear", json={"instance_id": INSTANCE, "location": "LocalCPUBackend"})
    assert response.status_code == 502
    assert response.json()["error"] == "agent_failed" and "OSError: device lost" in response.json()["detail"]
    assert response.json()["event_id"].startswith("Clear")


def test_the_result_stream_exists_once_start_returns(redis_url: str, real_redis: redis.Redis) -> None:
    """Workers answer with XADD NOMKSTREAM: a command sent right after start must find the stream there."""

    async def scenario() -> int:
        async with command_bus(redis_url, timeout_s=1) as bus:
            return int(real_redis.exists(bus.results_key))

    assert asyncio.run(scenario()) == 1


def test_a_command_sent_as_redis_comes_back_empty_is_answered(tmp_path: Path) -> None:
    """Redis restarted empty and an agent re-registered at its next heartbeat: a command sent before the reader task
    made the result stream again (it backs off while Redis is away) still gets its answer, which an agent writes
    only into a stream that exists."""
    server = RedisServer(free_port(), tmp_path)
    server.start()

    async def scenario() -> Outcome:
        async with command_bus(server.url, timeout_s=5) as bus:
            server.kill()
            await asyncio.sleep(1.5)  # the reader's backoff grows to its longest, a second
            server.start()
            enlist(redis.Redis.from_url(server.url), INSTANCE, 0)
            request = asyncio.create_task(bus.request(INSTANCE, CommandKind.CLEAR, "Clear-after", location=LOCATION))
            await answer(server.url, INSTANCE, 0, num_tokens=12)
            return await request

    try:
        outcome = asyncio.run(scenario())
    finally:
        server.kill()
    assert {w: (r.status, r.num_tokens) for w, r in outcome.results.items()} == {0: ("ok", 12)}


async def answer_slowly(url: str, worker_id: int, signs: int, every_s: float, *, then_answer: bool) -> float:
    """As a worker on a long command: sign that it is still working `signs` times, `every_s` apart, then answer
    (or fall silent); returns how long it worked."""
    client = await redis_conn.connect_async(url, blocking=True)
    group = keys.command_group(worker_id)
    started = time.monotonic()
    try:
        [(_, [(entry_id, fields)])] = await client.xreadgroup(
            group, group, {keys.commands(INSTANCE): ">"}, count=1, block=5000
        )
        command = decode(Command, fields)
        for _ in range(signs):
            await asyncio.sleep(every_s)
            working_ms = int((time.monotonic() - started) * 1000)
            await client.xadd(
                command.reply_to,
                Working(event_id=command.event_id, worker_id=worker_id, working_ms=working_ms).encode(),
            )
        if then_answer:
            result = Result(
                event_id=command.event_id,
                instance_id=INSTANCE,
                worker_id=worker_id,
                status=ResultStatus.OK,
                num_tokens=7,
            )
            await client.xadd(command.reply_to, encode(result))
            await client.xack(keys.commands(INSTANCE), group, entry_id)
        return time.monotonic() - started
    finally:
        await client.aclose()


def test_a_worker_that_signs_it_is_still_working_is_waited_for_past_the_timeout(
    redis_url: str, real_redis: redis.Redis
) -> None:
    enlist(real_redis, INSTANCE, 0)
    extensions: list[float] = []

    async def scenario() -> tuple[Outcome, float]:
        async with command_bus(redis_url, timeout_s=0.6) as bus:
            request = asyncio.create_task(
                bus.request(
                    INSTANCE, CommandKind.COMPRESS, event_ids.new(Operation.COMPRESS), extended=extensions.append
                )
            )
            worked = await answer_slowly(redis_url, 0, signs=6, every_s=0.3, then_answer=True)
            return await request, worked

    outcome, worked = asyncio.run(scenario())
    assert worked > 1.5  # well past the 0.6 s command timeout
    assert outcome.results[0].status == ResultStatus.OK and outcome.results[0].num_tokens == 7
    assert extensions == sorted(extensions) and len(extensions) >= 3  # each sign moved the end later


def test_a_worker_that_falls_silent_after_signing_times_out_a_timeout_after_its_last_sign(
    redis_url: str, real_redis: redis.Redis
) -> None:
    enlist(real_redis, INSTANCE, 0)

    async def scenario() -> tuple[float, str]:
        async with command_bus(redis_url, timeout_s=0.5) as bus:
            started = time.monotonic()
            signing = asyncio.create_task(answer_slowly(redis_url, 0, signs=3, every_s=0.3, then_answer=False))
            with pytest.raises(AgentTimeout, match="s in, then fell silent") as raised:
                await bus.request(INSTANCE, CommandKind.COMPRESS, event_ids.new(Operation.COMPRESS))
            await signing
            return time.monotonic() - started, str(raised.value)

    waited, message = asyncio.run(scenario())
    assert 1.3 < waited < 3.0  # the last sign at ~0.9 s, then the 0.5 s timeout (and the heartbeat check)
    working = re.search(r"still working (\d+\.\d) s in", message)
    assert working is not None and 0.8 <= float(working.group(1)) <= 1.4  # 3 signs 0.3 s apart, on a busy box


def test_signs_of_work_never_hold_a_command_past_its_longest_run(
    redis_url: str, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus_module, "LONGEST_COMMAND_TIMEOUTS", 3)
    enlist(real_redis, INSTANCE, 0)

    async def scenario() -> float:
        async with command_bus(redis_url, timeout_s=0.4) as bus:
            started = time.monotonic()
            signing = asyncio.create_task(answer_slowly(redis_url, 0, signs=12, every_s=0.2, then_answer=False))
            with pytest.raises(AgentTimeout, match=r"longest a command may run \(3 x command_timeout\)"):
                await bus.request(INSTANCE, CommandKind.COMPRESS, event_ids.new(Operation.COMPRESS))
            signing.cancel()
            await asyncio.gather(signing, return_exceptions=True)
            return time.monotonic() - started

    waited = asyncio.run(scenario())
    assert 1.1 < waited < 2.0  # 3 x 0.4 s, though the worker kept signing to 2.4 s


def test_a_long_command_answers_over_http_past_the_request_budget_while_its_worker_signs(
    client: TestClient, real_redis: redis.Redis, redis_url: str
) -> None:
    enlist(real_redis, INSTANCE, 0)
    worked: list[float] = []
    worker = threading.Thread(
        target=lambda: worked.append(asyncio.run(answer_slowly(redis_url, 0, signs=8, every_s=0.25, then_answer=True)))
    )
    worker.start()
    answer = post(client, "/compress", {"instance_id": INSTANCE, "location": LOCATION, "method": "zlib"})
    worker.join()
    assert answer["num_tokens"] == 7
    assert worked[0] > 1.8  # past the 0.5 s command_timeout and the 1 s the request's budget had


def test_a_real_agent_keeps_a_compress_longer_than_the_timeout_alive_until_it_answers(
    client: TestClient, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    store(agent, PROMPT)
    backend = next(b for b in agent.backends if b.location == LOCATION)
    compress = backend.compress

    def slow_compress(tokens: list[int], method: str) -> int:
        time.sleep(1.6)  # three times the module's 0.5 s command_timeout
        return compress(tokens, method)

    monkeypatch.setattr(backend, "compress", slow_compress)
    started = time.monotonic()
    answer = post(client, "/compress", {"instance_id": INSTANCE, "location": LOCATION, "method": "zstd"})
    assert time.monotonic() - started > 1.6
    assert answer["num_tokens"] == len(PROMPT)
    outcome = post(client, "/check_finish", {"event_id": answer["event_id"]})
    assert outcome["status"] == "finished"
