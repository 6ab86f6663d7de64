"""The command consumer against fakeredis: answers once, acks, expires, deduplicates."""

from __future__ import annotations

import time

import fakeredis
import pytest
import redis

from kvbus.agent.consumer import CommandConsumer
from kvbus.shared import keys
from kvbus.shared.flat_fields import encode
from kvbus.shared.messages import Command, CommandKind, Result, ResultStatus
from kvbus.shared.records import decode_result

INSTANCE = "inst-c"
REPLY = keys.results("ctl-test")


class CountingHandler:
    def __init__(self, num_tokens: int = 12, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.num_tokens = num_tokens
        self.fail = fail

    def __call__(self, command: Command) -> Result:
        self.calls.append(command.event_id)
        if self.fail:
            raise RuntimeError("buffers on fire")
        return Result(
            event_id=command.event_id,
            instance_id=INSTANCE,
            worker_id=0,
            status=ResultStatus.OK,
            num_tokens=self.num_tokens,
        )


def make_consumer(client: redis.Redis, handler: CountingHandler, flushes: list[int] | None = None) -> CommandConsumer:
    consumer = CommandConsumer(
        client,
        instance_id=INSTANCE,
        worker_id=0,
        handler=handler,
        before_reply=lambda: flushes.append(1) if flushes is not None else None,
        now_ms=lambda: int(time.time() * 1000),
    )
    consumer.ensure_group()
    client.xadd(REPLY, {"controller": "ctl-test"})
    return consumer


def send(client: redis.Redis, event_id: str, *, timeout_ms: int = 5000, entry_id: str = "*") -> str:
    command = Command(
        event_id=event_id, kind=CommandKind.CLEAR, reply_to=REPLY, timeout_ms=timeout_ms, location="LocalCPUBackend"
    )
    return str(client.xadd(keys.commands(INSTANCE), encode(command), id=entry_id))


def results(client: redis.Redis) -> list[Result]:
    return [result for _, fields in client.xrange(REPLY) if (result := decode_result(fields)) is not None]


def pending(client: redis.Redis) -> int:
    return int(client.xpending(keys.commands(INSTANCE), keys.command_group(0))["pending"])


def test_a_command_is_answered_then_acked(fake_redis: fakeredis.FakeRedis) -> None:
    handler, flushes = CountingHandler(), []
    consumer = make_consumer(fake_redis, handler, flushes)
    send(fake_redis, "Clear-1")
    assert consumer.poll(block_ms=100) == 1
    assert [(r.event_id, r.status, r.num_tokens) for r in results(fake_redis)] == [("Clear-1", "ok", 12)]
    assert pending(fake_redis) == 0
    assert flushes == [1]  # the index was flushed before the answer went out
    assert fake_redis.get(keys.done(INSTANCE, 0, "Clear-1")) == "12"


def test_a_command_past_its_deadline_is_answered_expired_and_not_run(fake_redis: fakeredis.FakeRedis) -> None:
    handler = CountingHandler()
    consumer = make_consumer(fake_redis, handler)
    send(fake_redis, "Clear-old", timeout_ms=1000, entry_id=f"{int(time.time() * 1000) - 5000}-0")
    consumer.poll(block_ms=100)
    assert handler.calls == []
    [result] = results(fake_redis)
    assert result.status == ResultStatus.EXPIRED and "past its deadline" in result.detail


def test_pending_commands_of_a_crashed_run_are_answered_once(fake_redis: fakeredis.FakeRedis) -> None:
    handler = CountingHandler()
    consumer = make_consumer(fake_redis, handler)
    for n in range(3):
        send(fake_redis, f"Clear-{n}")
    # A previous run read all three, answered the first, and died before the others.
    group = keys.command_group(0)
    fake_redis.xreadgroup(group, group, {keys.commands(INSTANCE): ">"}, count=3)
    fake_redis.set(keys.done(INSTANCE, 0, "Clear-0"), 12)
    assert consumer.drain_pending() == 3
    assert handler.calls == ["Clear-1", "Clear-2"]
    assert pending(fake_redis) == 0
    assert consumer.drain_pending() == 0
    assert [r.event_id for r in results(fake_redis)] == ["Clear-1", "Clear-2"]


def test_a_reply_that_failed_is_retried_without_running_the_command_again(
    fake_server: fakeredis.FakeServer,
    fake_redis: fakeredis.FakeRedis,
) -> None:
    handler = CountingHandler()

    def flaky_flush() -> None:
        if len(handler.calls) == 1 and not getattr(flaky_flush, "failed", False):
            flaky_flush.failed = True  # type: ignore[attr-defined]
            raise redis.ConnectionError("Redis went away")

    consumer = CommandConsumer(
        fake_redis,
        instance_id=INSTANCE,
        worker_id=0,
        handler=handler,
        before_reply=flaky_flush,
        now_ms=lambda: int(time.time() * 1000),
    )
    consumer.ensure_group()
    fake_redis.xadd(REPLY, {"controller": "ctl-test"})
    send(fake_redis, "Clear-1")
    with pytest.raises(redis.ConnectionError):
        consumer.poll(block_ms=100)
    assert consumer.drain_pending() == 1
    assert handler.calls == ["Clear-1"]
    assert [r.num_tokens for r in results(fake_redis)] == [12]


def test_a_handler_error_is_answered_as_error(fake_redis: fakeredis.FakeRedis) -> None:
    consumer = make_consumer(fake_redis, CountingHandler(fail=True))
    send(fake_redis, "Clear-boom")
    consumer.poll(block_ms=100)
    [result] = results(fake_redis)
    assert result.status == ResultStatus.ERROR
    assert result.detail == "RuntimeError: buffers on fire"
    assert pending(fake_redis) == 0


def test_an_undecodable_command_is_dropped_and_acked(fake_redis: fakeredis.FakeRedis) -> None:
    handler = CountingHandler()
    consumer = make_consumer(fake_redis, handler)
    fake_redis.xadd(keys.commands(INSTANCE), {"kind": "explode"})
    consumer.poll(block_ms=100)
    assert handler.calls == [] and results(fake_redis) == [] and pending(fake_redis) == 0


def test_no_result_stream_means_no_result_is_created(fake_redis: fakeredis.FakeRedis) -> None:
    consumer = make_consumer(fake_redis, CountingHandler())
    fake_redis.delete(REPLY)  # its controller is gone
    send(fake_redis, "Clear-orphan")
    consumer.poll(block_ms=100)
    assert fake_redis.exists(REPLY) == 0
    assert pending(fake_redis) == 0


def test_a_redelivery_past_its_deadline_without_a_record_is_acked_unanswered(
    fake_redis: fakeredis.FakeRedis,
) -> None:
    handler = CountingHandler()
    consumer = make_consumer(fake_redis, handler)
    send(fake_redis, "Clear-stale", timeout_ms=1000, entry_id=f"{int(time.time() * 1000) - 5000}-0")
    group = keys.command_group(0)
    fake_redis.xreadgroup(group, group, {keys.commands(INSTANCE): ">"})  # read by a run that then died
    assert consumer.drain_pending() == 1
    assert handler.calls == [] and results(fake_redis) == [] and pending(fake_redis) == 0


def test_the_done_record_lives_past_the_deadline_not_forever(fake_redis: fakeredis.FakeRedis) -> None:
    consumer = make_consumer(fake_redis, CountingHandler())
    send(fake_redis, "Clear-ttl", timeout_ms=5000)
    consumer.poll(block_ms=100)
    assert 60 < fake_redis.ttl(keys.done(INSTANCE, 0, "Clear-ttl")) <= 65


def test_after_reply_runs_once_the_answer_is_written(fake_redis: fakeredis.FakeRedis) -> None:
    seen: list[list[Result]] = []
    consumer = CommandConsumer(
        fake_redis,
        instance_id=INSTANCE,
        worker_id=0,
        handler=CountingHandler(),
        before_reply=lambda: None,
        now_ms=lambda: int(time.time() * 1000),
        after_reply=lambda: seen.append(results(fake_redis)),
    )
    consumer.ensure_group()
    fake_redis.xadd(REPLY, {"controller": "ctl-test"})
    send(fake_redis, "Clear-after")
    consumer.poll(block_ms=100)
    assert [[r.event_id for r in batch] for batch in seen] == [["Clear-after"]]
    assert consumer.poll(block_ms=10) == 0 and len(seen) == 1  # no answer, nothing to do after it


def test_a_pending_command_trimmed_away_is_acked_unanswered(fake_redis: fakeredis.FakeRedis) -> None:
    handler = CountingHandler()
    consumer = make_consumer(fake_redis, handler)
    send(fake_redis, "Clear-trimmed")
    group = keys.command_group(0)
    fake_redis.xreadgroup(group, group, {keys.commands(INSTANCE): ">"})  # read by a run that then died
    fake_redis.xtrim(keys.commands(INSTANCE), maxlen=0)
    assert consumer.drain_pending() == 1
    assert handler.calls == [] and results(fake_redis) == [] and pending(fake_redis) == 0


def test_a_rehearsal_runs_a_health_check_through_the_handler_and_writes_nothing(
    fake_redis: fakeredis.FakeRedis,
) -> None:
    handler = CountingHandler()
    consumer = make_consumer(fake_redis, handler)
    before = {key: fake_redis.type(key) for key in fake_redis.keys("*")}
    lengths = {key: fake_redis.xlen(key) for key, kind in before.items() if kind == "stream"}
    consumer.rehearse()
    assert handler.calls == ["rehearsal"]  # the handler ran once, on the made-up command
    assert {key: fake_redis.type(key) for key in fake_redis.keys("*")} == before
    assert {key: fake_redis.xlen(key) for key in lengths} == lengths
    send(fake_redis, "Clear-after")
    assert consumer.poll(block_ms=10) == 1  # and the consumer serves as before
    assert [r.event_id for _, f in fake_redis.xrange(REPLY) if (r := decode_result(f))] == ["Clear-after"]
