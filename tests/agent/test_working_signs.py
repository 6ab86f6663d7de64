"""WorkingSigns against a real redis-server: signs on the command's result stream while a long command runs,
none for a short one, none once the controller's stream is gone, and a clean stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from kvbus.agent.working_signs import WorkingSigns
from kvbus.shared import keys
from kvbus.shared.messages import Command, CommandKind
from kvbus.shared.records import ResultsOpened, Working, decode_result

REPLY = keys.results("ctl-test")


def command(event_id: str, timeout_ms: int = 5000) -> Command:
    return Command(event_id=event_id, kind=CommandKind.COMPRESS, reply_to=REPLY, timeout_ms=timeout_ms)


def signs(client: redis.Redis) -> list[Working]:
    entries = [decode_result(fields) for _, fields in client.xrange(REPLY)]
    return [entry for entry in entries if isinstance(entry, Working)]


@pytest.fixture
def working(real_redis: redis.Redis) -> Iterator[WorkingSigns]:
    real_redis.xadd(REPLY, ResultsOpened(controller="ctl-test").encode())
    running = WorkingSigns(real_redis, worker_id=3, interval_s=0.1)
    running.start()
    yield running
    running.stop()


def test_a_long_command_is_signed_for_every_interval_with_how_long_it_has_run(
    working: WorkingSigns, real_redis: redis.Redis
) -> None:
    with working.running(command("Compress1")):
        time.sleep(0.45)
    got = signs(real_redis)
    assert 3 <= len(got) <= 5
    assert {(sign.event_id, sign.worker_id) for sign in got} == {("Compress1", 3)}
    elapsed = [sign.working_ms for sign in got]
    assert elapsed == sorted(elapsed) and 80 <= elapsed[0] <= 250


def test_a_short_command_sends_no_sign_and_the_next_one_starts_its_own_count(
    working: WorkingSigns, real_redis: redis.Redis
) -> None:
    for n in range(5):
        with working.running(command(f"Clear{n}")):
            time.sleep(0.02)
    time.sleep(0.25)  # nothing runs now: nothing may be signed
    assert signs(real_redis) == []
    with working.running(command("Compress2")):
        time.sleep(0.15)
    assert [sign.event_id for sign in signs(real_redis)] == ["Compress2"]


def test_a_short_command_timeout_is_signed_for_within_a_quarter_of_it(
    real_redis: redis.Redis,
) -> None:
    real_redis.xadd(REPLY, ResultsOpened(controller="ctl-test").encode())
    running = WorkingSigns(real_redis, worker_id=0, interval_s=10.0)
    running.start()
    try:
        with running.running(command("Move1", timeout_ms=400)):
            time.sleep(0.35)
    finally:
        running.stop()
    assert len(signs(real_redis)) >= 2  # every 0.1 s, not every 10 s


def test_no_sign_creates_the_stream_of_a_controller_that_is_gone(
    working: WorkingSigns, real_redis: redis.Redis
) -> None:
    real_redis.delete(REPLY)
    with working.running(command("Compress3")):
        time.sleep(0.25)
    assert real_redis.exists(REPLY) == 0


def test_stop_ends_the_thread_while_a_command_runs(real_redis: redis.Redis) -> None:
    running = WorkingSigns(real_redis, worker_id=0, interval_s=0.05)
    running.start()
    entered = threading.Event()

    def long_command() -> None:
        with running.running(command("Compress4")):
            entered.set()
            time.sleep(0.3)

    worker = threading.Thread(target=long_command)
    worker.start()
    entered.wait(5)
    started = time.monotonic()
    running.stop()
    assert time.monotonic() - started < 1.0
    assert not any(t.name == "kvbus-working-0" and t.is_alive() for t in threading.enumerate())
    worker.join()
