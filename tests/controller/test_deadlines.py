"""Every request ends within its deadline however Redis behaves (deadlines.py, bus.py): a stalled Redis
(stopped with SIGSTOP, so that connections open and nothing answers) gives a 503 within `redis_timeout`
for lookups and queries and within `command_timeout` for commands, and everything works again as soon as
Redis does. Before, each request waited out three 5 s socket timeouts: 15 s for its 503."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from kvbus.controller.app import create_app
from kvbus.controller.deadlines import Deadlines, extend
from kvbus.shared import redis_conn
from tests.conftest import SEED_TOKENS, Processes, RedisServer, free_port, wait_for, write_config
from tests.controller.conftest import CheckedClient
from tests.controller.test_lookup import BASE, hold

REDIS_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 2.0
STALL_S = 20.0
SLACK_S = 0.5  # what a request may take past its deadline: scheduling, the 503 itself, a busy box
CLEAR = {"instance_id": "lmcache_default_instance", "location": "LocalCPUBackend"}


def test_a_call_cancelled_midway_leaves_no_half_read_connection_in_the_pool(stallable_redis: RedisServer) -> None:
    """What makes cancelling safe: the connection that waited is dropped, so the next call cannot read the
    answer meant for the cancelled one."""
    redis.Redis(port=stallable_redis.port).mset({"a": "answer for a", "b": "answer for b"})

    async def scenario() -> list[str | None]:
        client = await redis_conn.connect_async(stallable_redis.url)
        try:
            await client.ping()  # one pooled connection, which the cancelled call then takes
            stallable_redis.pause()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await client.get("a")
            stallable_redis.resume()  # Redis now answers the cancelled GET, on a connection nobody reads any more
            return [await client.get("b") for _ in range(3)]
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == ["answer for b"] * 3


@dataclass
class Timed:
    path: str
    started: float
    seconds: float
    status: int
    error: str = ""


class Load:
    """Lookups, clears and health checks, each in a loop of its own against a controller, every answer timed."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.answers: list[Timed] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        requests: list[tuple[str, Callable[[httpx.Client], httpx.Response]]] = [
            ("/lookup", lambda c: c.post("/lookup", json={"tokens": SEED_TOKENS})),
            ("/clear", lambda c: c.post("/clear", json=CLEAR)),
            ("/healthz", lambda c: c.get("/healthz")),
        ]
        self._threads = [threading.Thread(target=self._loop, args=r, daemon=True) for r in requests]

    def _loop(self, path: str, call: Callable[[httpx.Client], httpx.Response]) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                response = call(client)
                error = response.json().get("error", "") if response.status_code != 200 else ""
                with self._lock:
                    self.answers.append(Timed(path, started, time.monotonic() - started, response.status_code, error))
                time.sleep(0.02)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(70)


def test_a_stalled_redis_gives_503s_within_each_deadline_and_everything_recovers_within_a_second(
    stallable_redis: RedisServer, tmp_path: Path
) -> None:
    procs = Processes(tmp_path)
    try:
        procs.agent(stallable_redis.url)
        config = write_config(
            tmp_path / "controller.yaml",
            redis_url=stallable_redis.url,
            command_timeout=COMMAND_TIMEOUT_S,
            redis_timeout=REDIS_TIMEOUT_S,
        )
        port = free_port()
        procs._spawn(["controller", "--port", str(port), "--config", str(config)], "controller.log")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, what="controller /healthz")
        deadline = {"/lookup": REDIS_TIMEOUT_S, "/healthz": REDIS_TIMEOUT_S, "/clear": COMMAND_TIMEOUT_S}
        with Load(base) as load:
            time.sleep(2)
            stallable_redis.pause()
            stopped = time.monotonic()
            time.sleep(STALL_S)
            stallable_redis.resume()
            resumed = time.monotonic()
            time.sleep(4)
        answers = load.answers
        late = [a for a in answers if a.seconds > deadline[a.path] + SLACK_S]
        assert not late, late[:10]
        during = [a for a in answers if stopped + 0.1 < a.started and a.started + a.seconds < resumed]
        assert {a.path for a in during} == set(deadline), "every kind of request ran during the stall"
        assert all(a.status == 503 and a.error == "redis_unavailable" for a in during), during[:10]
        # Every request that started a second after Redis came back was answered in full.
        after = [a for a in answers if a.started > resumed + 1.0]
        assert {a.path for a in after} == set(deadline) and all(a.status == 200 for a in after), [
            a for a in after if a.status != 200
        ][:10]
        slowest = {path: max(a.seconds for a in during if a.path == path) for path in deadline}
        print(f"slowest answer during the stall, by path: {slowest}; {len(answers)} answers in all")
    finally:
        procs.stop_all()


def test_each_endpoint_answers_a_stalled_redis_within_its_deadline_and_says_what_it_can(
    stallable_redis: RedisServer,
) -> None:
    hold(stallable_redis.url, "keeper", SEED_TOKENS)
    config = BASE.with_overrides(redis_url=stallable_redis.url, redis_timeout=0.5, command_timeout=1.0)
    clear = {"instance_id": "keeper", "location": "LocalCPUBackend"}
    with CheckedClient(create_app(config)) as client:
        stallable_redis.pause()
        try:
            timed = {}
            for name, call in {
                "clear": lambda: client.post("/clear", json=clear),
                "lookup": lambda: client.post("/lookup", json={"tokens": SEED_TOKENS}),
                "check_finish": lambda: client.post("/check_finish", json={"event_id": "Clear-x"}),
                "key-stats": lambda: client.get("/controller/key-stats"),
                "dashboard": lambda: client.get("/dashboard.json"),
                "healthz": lambda: client.get("/healthz"),
                "metrics": lambda: client.get("/metrics"),
            }.items():
                started = time.monotonic()
                timed[name] = (call(), time.monotonic() - started)
        finally:
            stallable_redis.resume()
        for name, (response, seconds) in timed.items():
            assert seconds < 0.5 + SLACK_S, (name, seconds)
            if name == "metrics":  # a scrape still answers, with what this process knows
                assert response.status_code == 200 and "kvbus_redis_up 0.0" in response.text
            else:
                assert response.status_code == 503 and response.json()["error"] == "redis_unavailable", name
                assert "did not answer within 0.5 s" in response.json()["detail"], name
        stalled_clear = timed["clear"][0].json()
        assert stalled_clear["event_id"].startswith("Clear") and "/check_finish" in stalled_clear["detail"]
        assert client.get("/healthz").status_code == 200
        assert client.post("/lookup", json={"tokens": SEED_TOKENS}).json()["layout_info"] == {
            "keeper": ["LocalCPUBackend", 12]
        }


def test_the_bus_waits_for_a_command_s_answer_only_until_its_deadline_from_the_request_s_start(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 504 names the silent workers within command_timeout and the heartbeat check, even when that check
    cannot reach Redis."""
    hold(redis_url, "keeper", SEED_TOKENS)
    redis.Redis.from_url(redis_url).xgroup_create("kvbus:{keeper}:cmd", "worker-0", mkstream=True)
    app = create_app(BASE.with_overrides(redis_url=redis_url, command_timeout=1.0))
    with CheckedClient(app) as client:

        async def never(*args: object) -> None:
            await asyncio.Event().wait()

        monkeypatch.setattr(app.state.redis, "exists", never)
        started = time.monotonic()
        response = client.post("/clear", json={"instance_id": "keeper", "location": "LocalCPUBackend"})
        seconds = time.monotonic() - started
    assert response.status_code == 504 and "Redis became unreachable meanwhile" in response.json()["detail"]
    assert 1.0 <= seconds < 1.0 + SLACK_S


def _request(app_wait_s: float, upload: list[bytes], gap_s: float) -> tuple[int, float, float]:
    """Drive Deadlines (0.3 s for a lookup) around an app that reads the body, then waits `app_wait_s` as if on
    Redis; the body arrives in `upload`'s pieces, `gap_s` apart. Answers the status, when the body was in,
    and when the answer came, from the start."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await asyncio.sleep(app_wait_s)
        await Response(b"{}", media_type="application/json")(scope, receive, send)

    async def scenario() -> tuple[int, float, float]:
        loop = asyncio.get_running_loop()
        begun = loop.time()
        pieces = list(upload)
        body_in = 0.0
        sent: list[Message] = []

        async def receive() -> Message:
            nonlocal body_in
            await asyncio.sleep(gap_s)
            piece = pieces.pop(0)
            if not pieces:
                body_in = loop.time() - begun
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

        async def send(message: Message) -> None:
            sent.append(message)

        headers = [(b"content-length", str(sum(map(len, upload))).encode())]
        scope = {"type": "http", "method": "POST", "path": "/lookup", "headers": headers}
        await Deadlines(app, redis_timeout_s=0.3, command_timeout_s=1.0)(scope, receive, send)
        return sent[0]["status"], body_in, loop.time() - begun

    return asyncio.run(scenario())


def test_the_deadline_counts_from_the_body_s_arrival_so_a_slow_upload_is_no_stall() -> None:
    status, body_in, answered = _request(app_wait_s=0.1, upload=[b"{"] * 5 + [b"}"], gap_s=0.15)
    assert status == 200 and body_in > 0.8  # three times the budget to upload, and still answered
    status, body_in, answered = _request(app_wait_s=5.0, upload=[b"{}"], gap_s=0.0)
    assert status == 503 and 0.3 <= answered - body_in < 0.3 + SLACK_S


def _requests(plan: list[tuple[float, Callable[[Scope], Awaitable[None]]]]) -> list[tuple[int | None, float]]:
    """Drive Deadlines (0.3 s for a lookup) around an app that runs each request's own work: request i starts at
    plan[i][0] s and runs plan[i][1](scope). Answers each request's status (None when its task was cancelled by
    something other than its deadline) and when its answer came, from its start."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await scope["work"](scope)
        await Response(b"{}", media_type="application/json")(scope, receive, send)

    middleware = Deadlines(app, redis_timeout_s=0.3, command_timeout_s=1.0)

    async def one(at: float, work: Callable[[Scope], Awaitable[None]]) -> tuple[int | None, float]:
        await asyncio.sleep(at)
        loop = asyncio.get_running_loop()
        begun = loop.time()
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/lookup", "headers": [(b"content-length", b"2")]}
        scope["work"] = work
        try:
            await middleware(scope, receive, send)
        except asyncio.CancelledError:
            return None, loop.time() - begun
        return sent[0]["status"], loop.time() - begun

    async def scenario() -> list[tuple[int | None, float]]:
        return list(await asyncio.gather(*(one(at, work) for at, work in plan)))

    return asyncio.run(scenario())


async def _stall(scope: Scope) -> None:
    await asyncio.sleep(5.0)


async def _quick(scope: Scope) -> None:
    await asyncio.sleep(0.1)


def test_requests_sharing_a_budget_each_get_their_503_at_their_own_deadline() -> None:
    # One timer serves every request of a budget: each stalled one still ends at its own start + 0.3 s, whether
    # the requests before it ended early or stalled too.
    starts = [0.0, 0.05, 0.1, 0.15, 0.2, 0.5]
    answers = _requests([(at, _quick if n % 2 else _stall) for n, at in enumerate(starts)])
    for n, (status, took) in enumerate(answers):
        if n % 2:
            assert status == 200 and took < 0.3, (n, status, took)
        else:
            assert status == 503 and 0.3 <= took < 0.3 + SLACK_S, (n, status, took)


def test_an_extended_request_runs_past_its_budget_while_the_others_keep_theirs() -> None:
    async def still_working(scope: Scope) -> None:
        await asyncio.sleep(0.2)
        # As the bus does when a worker signs it is still at it: the deadline moves to 2 x SILENCE_S past this.
        extend(scope, asyncio.get_running_loop().time())
        await asyncio.sleep(0.4)  # ends 0.6 s in: past the budget, within the extension

    (extended, _), (stalled, took) = _requests([(0.0, still_working), (0.05, _stall)])
    assert extended == 200
    assert stalled == 503 and 0.3 <= took < 0.3 + SLACK_S


def test_a_cancellation_that_is_not_the_deadline_s_goes_on_as_it_came() -> None:
    async def cancelled_by_another(scope: Scope) -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_later(0.1, task.cancel)  # a client that went away, say
        await asyncio.sleep(5.0)

    ((status, took),) = _requests([(0.0, cancelled_by_another)])
    assert status is None and took < 0.3  # no 503 made up for it, and no wait for the deadline


def test_the_middleware_keeps_no_event_loop_it_served_alive() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await Response(b"{}", media_type="application/json")(scope, receive, send)

    middleware = Deadlines(app, redis_timeout_s=1.0, command_timeout_s=1.0)

    async def one() -> asyncio.AbstractEventLoop:
        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            pass

        await middleware({"type": "http", "method": "GET", "path": "/healthz", "headers": []}, receive, send)
        return asyncio.get_running_loop()

    served = [weakref.ref(asyncio.run(one())) for _ in range(3)]  # as tests serve one app from loop after loop
    gc.collect()
    assert [loop() for loop in served] == [None, None, None]  # each went with its run, its deadline timer set
