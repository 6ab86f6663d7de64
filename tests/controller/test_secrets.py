"""No secret of the controller's shows anywhere: neither Redis's password (in redis_url) nor the API token is on
its command line, in its log, or in any answer it gives (errors, /metrics, the dashboard, /openapi.json),
whether Redis answers or not."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from kvbus.agent.agent import Agent
from tests.conftest import MODEL, SEED_TOKENS, RedisServer, free_port, wait_for
from tests.controller.test_routes import BASE, CPU, INSTANCE, store

PASSWORD = "redis-pw-6c2e91"
TOKEN = "api-token-0b7d44"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    admin = redis.Redis(port=server.port)
    admin.config_set("requirepass", PASSWORD)
    admin.close()
    yield server
    server.kill()


def test_neither_redis_s_password_nor_the_api_token_shows_anywhere(guarded: RedisServer, tmp_path: Path) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{guarded.port}/0"
    agent = Agent(BASE.with_overrides(redis_url=url), model=MODEL)
    agent.start()
    port = free_port()
    log = tmp_path / "controller.log"
    # Both secrets as the README says to give them: in the environment, never as flags.
    env = {**{k: v for k, v in os.environ.items() if k != "LMCACHE_CONFIG_FILE"}}
    env.update(LMCACHE_REDIS_URL=url, KVBUS_API_TOKEN=TOKEN)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvbus", "controller", "--port", str(port), "--command-timeout", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    answers: list[httpx.Response] = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, what="controller /healthz")
        store(agent, SEED_TOKENS)
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_text()
        with httpx.Client(base_url=base, headers=AUTH, timeout=10) as client:

            def everything() -> None:
                answers.extend(
                    [
                        client.get("/healthz"),
                        client.get("/openapi.json"),
                        client.get("/metrics"),
                        client.get("/dashboard.json"),
                        client.get("/controller/workers"),
                        client.post("/lookup", json={"tokens": SEED_TOKENS}),
                        client.post("/clear", json=CPU),
                        client.post("/check_finish", json={"event_id": "Clear-none"}),
                        client.post("/clear", json={"instance_id": 5}),
                        client.post("/clear", content=b"{}", headers={"content-type": "text/plain"}),
                        client.get("/clear"),
                        client.get("/nowhere"),
                        client.get("/controller/key-stats", headers={"authorization": "Bearer wrong"}),
                    ]
                )

            everything()
            assert answers[6].json()["num_tokens"] == 12, answers[6].text
            agent.stop()
            guarded.kill()  # and again with Redis gone: every 503 says why without the URL's password
            everything()
            assert answers[-8].status_code == 503, answers[-8].text  # /lookup
    finally:
        agent.stop()
        process.terminate()
        process.wait(20)
    shown = [cmdline, log.read_text(), *(f"{a.headers}\n{a.text}" for a in answers)]
    for text in shown:
        assert PASSWORD not in text and TOKEN not in text, text[:2000]
    assert "redis://***@127.0.0.1" in log.read_text()  # what the log names instead
    assert str(INSTANCE) in answers[3].text  # the dashboard had something to show
