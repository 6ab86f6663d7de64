"""The command thread's loop against a real Redis, one node (its own connection, each answer sent with
the next read) and a cluster (the cluster client): every command answered once, in order, and acked."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from kvbus.agent.backends.base import IndexEntry
from kvbus.agent.consumer import CommandConsumer
from kvbus.agent.index_writer import IndexWriter
from kvbus.shared import keys, redis_conn
from kvbus.shared.flat_fields import encode
from kvbus.shared.locations import Location
from kvbus.shared.messages import Command, CommandKind, Result, ResultStatus
from kvbus.shared.records import decode_result

REDIS_BACKENDS = ("single", "cluster")
INSTANCE = "inst-loop"
REPLY = keys.results("ctl-loop")


def test_the_loop_answers_each_command_once_and_acks_it(redis_url: str, real_redis: redis.Redis) -> None:
    calls: list[str] = []
    after: list[int] = []

    def handler(command: Command) -> Result:
        calls.append(command.event_id)
        return Result(
            event_id=command.event_id, instance_id=INSTANCE, worker_id=0, status=ResultStatus.OK, num_tokens=7
        )

    client = redis_conn.connect(redis_url, blocking=True)
    real_redis.xadd(REPLY, {"controller": "ctl-loop"})
    consumer, stop, thread = _running(client, handler, before_reply=lambda: None, after_reply=lambda: after.append(1))
    try:
        for n in range(5):
            command = Command(
                event_id=f"Clear-{n}", kind=CommandKind.CLEAR, reply_to=REPLY, timeout_ms=5000, location="cpu"
            )
            real_redis.xadd(keys.commands(INSTANCE), encode(command))
            deadline = time.monotonic() + 5
            while len(_results(real_redis)) < n + 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert [r.event_id for r in _results(real_redis)] == [f"Clear-{i}" for i in range(n + 1)]
    finally:
        _stop(consumer, stop, thread)
        client.close()
    assert not thread.is_alive()
    assert calls == [f"Clear-{n}" for n in range(5)]
    assert [r.num_tokens for r in _results(real_redis)] == [7] * 5
    assert int(real_redis.xpending(keys.commands(INSTANCE), keys.command_group(0))["pending"]) == 0
    assert len(after) == 5  # once per answer, after it was sent
    assert real_redis.get(keys.done(INSTANCE, 0, "Clear-4")) == "7"


def _results(client: redis.Redis) -> list[Result]:
    return [result for _, fields in client.xrange(REPLY) if (result := decode_result(fields)) is not None]


def _running(
    client: redis_conn.Client, handler: Callable[[Command], Result], **options: Any
) -> tuple[CommandConsumer, threading.Event, threading.Thread]:
    """INSTANCE's worker 0 consumer on `client`, its group made and its loop running on a thread of its own."""
    consumer = CommandConsumer(
        client, instance_id=INSTANCE, worker_id=0, handler=handler, now_ms=lambda: int(time.time() * 1000), **options
    )
    consumer.ensure_group()
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop, lambda: None), daemon=True)
    thread.start()
    return consumer, stop, thread


def _stop(consumer: CommandConsumer, stop: threading.Event, thread: threading.Thread) -> None:
    """Stop the loop as a stopping agent does: set its stop, then end its wait for commands."""
    stop.set()
    consumer.interrupt()
    thread.join(timeout=5)


def test_the_index_is_written_before_each_answer_is_visible(redis_url: str, real_redis: redis.Redis) -> None:
    client = redis_conn.connect(redis_url, blocking=True)
    index = IndexWriter(client, INSTANCE, 0)  # its thread not started: only the command thread writes
    seen_at_answer: list[int] = []

    def handler(command: Command) -> Result:
        if command.event_id.startswith("Admit"):
            index.admitted(Location.CPU, IndexEntry(command.event_id, 4, False))
        else:
            index.cleared(Location.CPU)
        return Result(
            event_id=command.event_id, instance_id=INSTANCE, worker_id=0, status=ResultStatus.OK, num_tokens=4
        )

    real_redis.xadd(REPLY, {"controller": "ctl-loop"})
    consumer, stop, thread = _running(client, handler, before_reply=index.flush, index=index)
    events = ["Admit-1", "Admit-2", "Clear-1", "Admit-3"]
    try:
        for n, event_id in enumerate(events):
            command = Command(event_id=event_id, kind=CommandKind.CLEAR, reply_to=REPLY, timeout_ms=5000, location="")
            real_redis.xadd(keys.commands(INSTANCE), encode(command))
            deadline = time.monotonic() + 5
            while len(_results(real_redis)) < n + 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            seen_at_answer.append(real_redis.hlen(keys.index(INSTANCE, 0, Location.CPU)))
    finally:
        _stop(consumer, stop, thread)
        client.close()
    assert not thread.is_alive()
    assert [r.event_id for r in _results(real_redis)] == events
    assert seen_at_answer == [1, 2, 0, 1]


def test_an_answer_whose_write_failed_is_sent_again_after_its_index_writes(
    redis_url: str, real_redis: redis.Redis, redis_backend: str
) -> None:
    if redis_backend == "cluster":
        pytest.skip("a cluster flushes the index in a round trip of its own, as tested above")
    client = redis_conn.connect(redis_url, blocking=True)
    index = IndexWriter(client, INSTANCE, 0)  # its thread not started: only the command thread writes
    calls: list[str] = []

    def handler(command: Command) -> Result:
        calls.append(command.event_id)
        index.admitted(Location.CPU, IndexEntry(command.event_id, 4, False))
        # Every other connection drops: the write that carries this answer and its index writes fails.
        real_redis.client_kill_filter(_type="normal", skipme=True)
        return Result(
            event_id=command.event_id, instance_id=INSTANCE, worker_id=0, status=ResultStatus.OK, num_tokens=4
        )

    real_redis.xadd(REPLY, {"controller": "ctl-loop"})
    consumer, stop, thread = _running(client, handler, before_reply=index.flush, index=index)
    try:
        command = Command(event_id="Admit-1", kind=CommandKind.CLEAR, reply_to=REPLY, timeout_ms=5000, location="")
        real_redis.xadd(keys.commands(INSTANCE), encode(command))
        deadline = time.monotonic() + 10
        while not _results(real_redis) and time.monotonic() < deadline:
            time.sleep(0.001)
        index_at_answer = real_redis.hlen(keys.index(INSTANCE, 0, Location.CPU))
    finally:
        _stop(consumer, stop, thread)
        client.close()
    assert not thread.is_alive()
    assert [r.event_id for r in _results(real_redis)] == ["Admit-1"]
    assert calls == ["Admit-1"]  # redelivered after the failure, answered from the result it remembered
    assert index_at_answer == 1
    assert int(real_redis.xpending(keys.commands(INSTANCE), keys.command_group(0))["pending"]) == 0


def test_a_stop_ends_the_long_wait_for_commands_at_once_and_still_answers_the_command_in_hand(
    redis_url: str, real_redis: redis.Redis
) -> None:
    """An idle thread waits for commands up to IDLE_BLOCK_MS in one read (each wake-up costs the engine
    CPU); a stop must not wait that out, nor drop the answer of a command the thread is running."""
    entered, release = threading.Event(), threading.Event()

    def handler(command: Command) -> Result:
        entered.set()
        release.wait(5)
        return Result(
            event_id=command.event_id, instance_id=INSTANCE, worker_id=0, status=ResultStatus.OK, num_tokens=3
        )

    def start() -> tuple[CommandConsumer, threading.Event, threading.Thread, redis_conn.Client]:
        client = redis_conn.connect(redis_url, blocking=True)
        return *_running(client, handler, before_reply=lambda: None), client

    real_redis.xadd(REPLY, {"controller": "ctl-loop"})
    consumer, stop, thread, client = start()
    time.sleep(0.3)  # into its wait
    stopped_at = time.monotonic()
    _stop(consumer, stop, thread)
    client.close()
    assert not thread.is_alive() and time.monotonic() - stopped_at < 2

    consumer, stop, thread, client = start()
    command = Command(event_id="Clear-held", kind=CommandKind.CLEAR, reply_to=REPLY, timeout_ms=5000, location="cpu")
    real_redis.xadd(keys.commands(INSTANCE), encode(command))
    assert entered.wait(5)
    stop.set()
    consumer.interrupt()
    release.set()
    thread.join(timeout=5)
    client.close()
    assert not thread.is_alive()
    assert [(r.event_id, r.num_tokens) for r in _results(real_redis)] == [("Clear-held", 3)]
    assert int(real_redis.xpending(keys.commands(INSTANCE), keys.command_group(0))["pending"]) == 0


def test_an_answer_redis_refuses_is_logged_and_the_commands_after_it_are_still_answered(
    redis_url: str, real_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused write (here WRONGTYPE: the command's result stream is a string; in production an out-of-memory
    Redis) costs that command's caller its answer, not the agent its command thread."""

    def handler(command: Command) -> Result:
        return Result(
            event_id=command.event_id, instance_id=INSTANCE, worker_id=0, status=ResultStatus.OK, num_tokens=5
        )

    not_a_stream = keys.results("ctl-not-a-stream")
    real_redis.set(not_a_stream, "a string")
    real_redis.xadd(REPLY, {"controller": "ctl-loop"})
    client = redis_conn.connect(redis_url, blocking=True)
    consumer, stop, thread = _running(client, handler, before_reply=lambda: None)
    try:
        for event_id, reply_to in (("Clear-refused", not_a_stream), ("Clear-after", REPLY)):
            command = Command(event_id=event_id, kind=CommandKind.CLEAR, reply_to=reply_to, timeout_ms=5000)
            real_redis.xadd(keys.commands(INSTANCE), encode(command))
        deadline = time.monotonic() + 5
        while not _results(real_redis) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert thread.is_alive()
    finally:
        _stop(consumer, stop, thread)
        client.close()
    assert [(r.event_id, r.num_tokens) for r in _results(real_redis)] == [("Clear-after", 5)]
    assert real_redis.get(not_a_stream) == "a string"
    assert int(real_redis.xpending(keys.commands(INSTANCE), keys.command_group(0))["pending"]) == 0
    refused = [r for r in caplog.records if r.levelname == "ERROR" and "refused" in r.getMessage()]
    assert len(refused) == 1 and "WRONGTYPE" in refused[0].getMessage()
