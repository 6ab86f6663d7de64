"""Errors as answers (errors.py): Redis going away is a 503 the controller recovers from, routing's own
refusals and unexpected failures are JSON of the same shape as every other error."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from starlette.testclient import TestClient

from kvbus.controller import registry
from kvbus.controller.app import create_app
from kvbus.shared.config import KVBusConfig
from tests.conftest import SEED_TOKENS, RedisServer, free_port
from tests.controller.conftest import CheckedClient
from tests.controller.test_lookup import BASE, hold, lookup


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


def test_unknown_paths_and_methods_answer_json(client: TestClient) -> None:
    assert client.get("/nowhere").json()["detail"] == "Not Found"
    assert client.get("/nowhere").json()["error"] == "http"
    response = client.get("/clear")
    assert response.status_code == 405 and response.json()["error"] == "http"
    assert response.headers["allow"] == "POST"  # RFC 9110: a 405 lists the methods the path takes
    assert set(client.delete("/controller/workers").headers["allow"].split(", ")) == {"GET", "HEAD"}  # a set


def test_an_unexpected_failure_is_a_json_500_naming_it(config: KVBusConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(registry, "key_stats", broken)
    # The test client would re-raise the failure; what a real client sees is the answer.
    with CheckedClient(create_app(config), raise_server_exceptions=False) as client:
        response = client.get("/controller/key-stats")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error: RuntimeError: a bug", "error": "internal"}


def test_redis_down_is_503_and_the_controller_recovers(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        config = BASE.with_overrides(redis_url=server.url)
        hold(server.url, "keeper", SEED_TOKENS)
        with CheckedClient(create_app(config)) as client:
            assert lookup(client, SEED_TOKENS) == {"keeper": ["LocalCPUBackend", 12]}
            server.kill()
            for path, body in (
                ("/lookup", {"tokens": SEED_TOKENS}),
                ("/clear", {"instance_id": "keeper", "location": "LocalCPUBackend"}),
            ):
                response = client.post(path, json=body)
                assert response.status_code == 503
                assert response.json()["error"] == "redis_unavailable"
                assert "Redis is unreachable" in response.json()["detail"]
            assert client.get("/healthz").status_code == 503
            server.start()
            hold(server.url, "keeper", SEED_TOKENS)  # a restarted Redis is empty until agents re-register
            assert lookup(client, SEED_TOKENS) == {"keeper": ["LocalCPUBackend", 12]}
            assert client.get("/healthz").json()["status"] == "ok"
    finally:
        server.kill()


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own that wants a password, and has an ACL user allowed nothing but PING."""
    server = RedisServer(free_port(), tmp_path)
    server.start()
    admin = redis.Redis(port=server.port)
    admin.acl_setuser("pinger", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], commands=["+ping", "+hello"])
    admin.config_set("requirepass", PASSWORD)
    admin.close()
    yield server
    server.kill()


PASSWORD = "s3cret-pw-0123"


@pytest.mark.parametrize(
    ("credentials", "says"),
    [
        (":wrong-pw@", "refused the controller's credentials"),
        ("", "refused the controller's credentials"),  # none given: NOAUTH
        (f"pinger:{PASSWORD}@", "denies redis_url's user a command"),  # the right password, an ACL user without rights
    ],
)
def test_a_credentials_problem_says_so_and_names_redis_url_both_at_start_and_in_every_503(
    guarded: RedisServer, credentials: str, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://{credentials}127.0.0.1:{guarded.port}/0"
    caplog.set_level(logging.INFO, logger="kvbus.controller")
    with CheckedClient(create_app(BASE.with_overrides(redis_url=url))) as client:
        answers = [
            client.post("/lookup", json={"tokens": SEED_TOKENS}),
            client.post("/clear", json={"instance_id": "keeper", "location": "LocalCPUBackend"}),
            client.get("/controller/key-stats"),
        ]
        if not credentials.startswith("pinger"):
            answers.append(client.get("/healthz"))  # the ACL user may PING
        for response in answers:
            assert response.status_code == 503, response.text
            answer = response.json()
            assert answer["error"] == "redis_auth_failed", answer
            assert says in answer["detail"] and "redis_url" in answer["detail"], answer
            assert "unreachable" not in answer["detail"] and PASSWORD not in response.text
    if credentials.startswith("pinger"):
        return  # PING is allowed: start-up could not tell, the first request that needed more did
    started = [r.getMessage() for r in caplog.records if "every request that needs Redis" in r.getMessage()]
    assert len(started) == 1 and says in started[0] and "redis_url" in started[0], caplog.text
    assert PASSWORD not in caplog.text and "wrong-pw" not in caplog.text
