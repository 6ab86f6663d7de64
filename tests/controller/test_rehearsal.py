"""The start-up rehearsal (rehearsal.py): requests through uvicorn's HTTP protocol to an app, and a controller's
own rehearsal, which leaves nothing an operator reads: no /metrics counts, no commands in Redis, no log lines."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from kvbus.controller import rehearsal
from kvbus.controller.app import WARM_RUNS, create_app
from kvbus.shared import keys
from kvbus.shared.config import KVBusConfig


class Recorder:
    """An ASGI app answering each POST with the status its path names (/201 -> 201), recording what arrived."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes, str | None]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        authorization = dict(scope["headers"]).get(b"authorization")
        sent_token = None if authorization is None else authorization.decode()
        self.seen.append((scope["method"], scope["path"], body, sent_token))
        answer = b'{"ok":true}'
        await send(
            {
                "type": "http.response.start",
                "status": int(scope["path"].strip("/")),
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": answer})


def test_each_request_goes_through_uvicorn_s_protocol_to_the_app_and_its_status_comes_back() -> None:
    app = Recorder()
    requests = [rehearsal.post("/200", b'{"a":1}', None), rehearsal.post("/404", b"[]", "s3cret")] * 3
    statuses = asyncio.run(rehearsal.rehearse(app, requests))
    assert statuses == [200, 404] * 3
    assert app.seen == [("POST", "/200", b'{"a":1}', None), ("POST", "/404", b"[]", "Bearer s3cret")] * 3


def test_connections_send_at_once_each_its_share_in_order() -> None:
    in_flight = 0
    all_in = asyncio.Event()
    paths: list[str] = []

    async def barrier(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal in_flight
        paths.append(scope["path"])
        in_flight += 1
        if in_flight == 3:
            all_in.set()
        await all_in.wait()  # only three connections at once get past this
        length = [(b"content-length", b"0")]
        await send({"type": "http.response.start", "status": int(scope["path"].strip("/")), "headers": length})
        await send({"type": "http.response.body", "body": b""})

    requests = [rehearsal.post(f"/{status}", b"{}", None) for status in (200, 201, 202, 203, 206, 207)]
    statuses = asyncio.run(rehearsal.rehearse(barrier, requests, connections=3))
    assert statuses == [200, 203, 201, 206, 202, 207]  # connection by connection: every third request
    assert sorted(paths[:3]) == ["/200", "/201", "/202"]


def test_an_app_that_never_answers_ends_the_rehearsal_at_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(rehearsal, "TIMEOUT_S", 0.2)
    with pytest.raises(TimeoutError):
        asyncio.run(rehearsal.rehearse(silent, [rehearsal.post("/200", b"{}", None)]))


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return KVBusConfig(redis_url=redis_url)


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_a_controller_rehearses_at_start_up_and_nothing_counts_it(
    config: KVBusConfig, real_redis: redis.Redis, caplog: pytest.LogCaptureFixture, token: str | None
) -> None:
    app = create_app(config.with_overrides(api_token=token))
    with caplog.at_level(logging.DEBUG, logger="kvbus.controller"), TestClient(app) as client:
        scraped = client.get("/metrics", headers={} if token is None else {"Authorization": f"Bearer {token}"})
    assert f"rehearsed the HTTP path: {2 * WARM_RUNS} requests in" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # every request passed the guard
    samples = {
        (sample.name, sample.labels.get("path"), sample.labels.get("result")): sample.value
        for family in text_string_to_metric_families(scraped.text)
        for sample in family.samples
    }
    assert not [key for key in samples if key[0] == "kvbus_http_requests_total" and key[1] != "/metrics"]
    assert samples[("kvbus_lookups_total", None, "miss")] == 0
    assert samples[("kvbus_lookups_total", None, "hit")] == 0
    # The clears went to an instance nobody registered: no stream, no record, no journal entry.
    assert not real_redis.exists(keys.JOURNAL)
    assert not [key for key in real_redis.scan_iter() if "warm-up" in key]


def test_without_redis_at_start_up_there_is_no_rehearsal(caplog: pytest.LogCaptureFixture) -> None:
    unreachable = KVBusConfig(redis_url="redis://127.0.0.1:1/0", redis_timeout=0.2)
    with caplog.at_level(logging.DEBUG, logger="kvbus.controller"), TestClient(create_app(unreachable)):
        pass
    assert "rehearsed" not in caplog.text and "rehearsal" not in caplog.text
    assert not [r for r in caplog.records if "-> 503" in r.getMessage()]
