"""Who may drive the API (guard.py): with an API token, every endpoint but /healthz and the dashboard page
wants it; with or without one, a web page on another origin cannot drive the API, and a POST body must be
sent as JSON. Before, any page could clear a cache: a browser's cross-origin text/plain POST (which needs
no CORS preflight) to /clear was parsed as JSON and freed the instance's tokens."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from kvbus.agent.agent import Agent
from kvbus.controller.app import create_app
from kvbus.controller.openapi import ENDPOINTS
from kvbus.shared.config import ConfigError, KVBusConfig, load
from tests.conftest import SEED_TOKENS, free_port, wait_for
from tests.controller.conftest import CheckedClient
from tests.controller.test_routes import BASE, CPU, INSTANCE, post, store

TOKEN = "kvbus-test-token-5d1f0c"
# A controller process's environment: the token, and no config file but the test's.
ENV = {**{k: v for k, v in os.environ.items() if k != "LMCACHE_CONFIG_FILE"}, "KVBUS_API_TOKEN": TOKEN}
HOST = "testserver"  # what Starlette's test client sends as Host
EVIL = {"origin": "https://evil.example", "sec-fetch-site": "cross-site"}
# Every body-taking endpoint, with a body it accepts.
BODIES: dict[str, dict[str, Any]] = {
    "/lookup": {"tokens": SEED_TOKENS},
    "/clear": CPU,
    "/pin": {**CPU, "tokens": SEED_TOKENS},
    "/unpin": {**CPU, "tokens": SEED_TOKENS},
    "/compress": {**CPU, "method": "zlib"},
    "/decompress": {**CPU, "method": "zlib"},
    "/move": {"old_position": [INSTANCE, "LocalCPUBackend"], "new_position": ["elsewhere", "LocalCPUBackend"]},
    "/health": {"instance_id": INSTANCE},
    "/check_finish": {"event_id": "Clear-x"},
    "/query_worker_info": {"instance_id": "all"},
    "/query_instance": {"event_id": "e", "ip": "127.0.0.1"},
}


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


@pytest.fixture
def locked(config: KVBusConfig) -> Iterator[TestClient]:
    with CheckedClient(create_app(config.with_overrides(api_token=TOKEN))) as client:
        yield client


def held(client: TestClient) -> int:
    layout = post(client, "/lookup", {"tokens": SEED_TOKENS})["layout_info"]
    return int(layout.get(INSTANCE, ["", 0])[1])


def test_the_cross_origin_text_plain_post_that_cleared_a_cache_is_refused(client: TestClient, agent: Agent) -> None:
    store(agent, SEED_TOKENS)
    body = httpx.Request("POST", "/", json=CPU).content.decode()
    # What a page's fetch(url, {method: "POST", body}) sends: text/plain, with its origin.
    attack = client.post("/clear", content=body, headers={"content-type": "text/plain;charset=UTF-8", **EVIL})
    assert attack.status_code == 403 and attack.json()["error"] == "cross_origin"
    # The same bytes without browser headers still are no JSON request, and the chunks stay.
    plain = client.post("/clear", content=body, headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"] == "unsupported_media_type"
    assert "Content-Type: text/plain" in plain.json()["detail"]
    assert held(client) == 12
    assert post(client, "/clear", CPU)["num_tokens"] == 12  # as LMCache's clients send it: application/json


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "text/plain"},
        {"content-type": "application/x-www-form-urlencoded"},
        {"content-type": "multipart/form-data; boundary=x"},
        {},
    ],
    ids=["text", "form", "multipart", "no-content-type"],
)
def test_every_post_wants_a_json_body(client: TestClient, headers: dict[str, str]) -> None:
    for path, body in BODIES.items():
        response = client.post(path, content=httpx.Request("POST", "/", json=body).content, headers=headers)
        assert response.status_code == 415, (path, response.text)
        assert response.json()["error"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "https://evil.example"},
        {"origin": "http://testserver:8000"},  # another port of the same host is another origin
        {"origin": "null"},  # a sandboxed frame, a file:// page
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ],
)
def test_a_browser_request_from_another_origin_is_refused_on_every_post(
    client: TestClient, headers: dict[str, str]
) -> None:
    for path, body in BODIES.items():
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"] == "cross_origin" and "another origin" in response.json()["detail"]


def test_the_controller_s_own_page_and_programs_may_post_and_any_origin_may_read(client: TestClient) -> None:
    own = {"origin": f"http://{HOST}", "sec-fetch-site": "same-origin"}
    assert client.post("/lookup", json={"tokens": [1]}, headers=own).status_code == 200
    assert client.post("/lookup", json={"tokens": [1]}, headers={"sec-fetch-site": "none"}).status_code == 200
    assert client.post("/lookup", json={"tokens": [1]}).status_code == 200  # curl, LMCache's clients
    # A GET changes nothing, and no page can read its answer across origins: kvbus sends no CORS headers.
    answer = client.get("/controller/key-stats", headers=EVIL)
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_with_a_token_every_endpoint_but_healthz_and_the_dashboard_page_wants_it(locked: TestClient) -> None:
    for endpoint in ENDPOINTS:
        request: dict[str, Any] = {"json": BODIES[endpoint.path]} if endpoint.method == "post" else {}
        response = locked.request(endpoint.method, endpoint.path, **request)
        if endpoint.path in ("/healthz", "/"):
            assert response.status_code == 200, endpoint.path
            continue
        assert response.status_code == 401, (endpoint.path, response.text)
        assert response.json()["error"] == "unauthorized" and "Authorization: Bearer" in response.json()["detail"]
        assert response.headers["www-authenticate"] == 'Bearer realm="kvbus"'
        authorized = locked.request(
            endpoint.method, endpoint.path, headers={"authorization": f"Bearer {TOKEN}"}, **request
        )
        assert authorized.status_code != 401, endpoint.path
    for path in ("/openapi.json", "/nowhere", "/static/../dashboard.json"):
        assert locked.get(path).status_code == 401, path
    assert locked.get("/static/dashboard.js").status_code == 200  # the page's own assets


@pytest.mark.parametrize(
    "authorization",
    [TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer", "Bearer  ", ""],
)
def test_only_the_token_itself_as_a_bearer_opens_the_api(locked: TestClient, authorization: str) -> None:
    response = locked.post("/lookup", json={"tokens": [1]}, headers={"authorization": authorization})
    assert response.status_code == 401
    assert TOKEN not in response.text


def test_the_bearer_scheme_is_read_in_any_case(locked: TestClient) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = locked.post("/lookup", json={"tokens": [1]}, headers={"authorization": f"{scheme} {TOKEN}"})
        assert response.status_code == 200, scheme


def test_a_token_does_not_let_another_origin_in(locked: TestClient) -> None:
    response = locked.post("/lookup", json={"tokens": [1]}, headers={"authorization": f"Bearer {TOKEN}", **EVIL})
    assert response.status_code == 403


def test_the_token_is_never_shown(config: KVBusConfig, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    secret = config.with_overrides(api_token=TOKEN)
    assert TOKEN not in repr(secret)
    with TestClient(create_app(secret)) as client:  # not checked: /openapi.json documents no schema of itself
        client.get("/controller/key-stats")
        client.get("/controller/key-stats", headers={"authorization": "Bearer wrong"})
        spec = client.get("/openapi.json", headers={"authorization": f"Bearer {TOKEN}"}).text
    assert "API token set" in caplog.text and TOKEN not in caplog.text and TOKEN not in spec
    # A value the config refuses is named in its error, except a secret.
    path = tmp_path / "bad.yaml"
    path.write_text(f"api_token: [{TOKEN}]\n")
    with pytest.raises(ConfigError, match="api_token=<hidden>") as refused:
        load(path)
    assert TOKEN not in str(refused.value)
    path.write_text("redis_url: http://user:pa55word@host:6379/0\n")
    with pytest.raises(ConfigError, match=r"redis_url=http://\*\*\*@host:6379/0") as refused:
        load(path)
    assert "pa55word" not in str(refused.value)


def test_the_controller_takes_its_token_from_kvbus_api_token(redis_url: str, tmp_path: Path) -> None:
    """Set in the environment, it is on no command line and in no log."""
    port = free_port()
    log = tmp_path / "controller.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvbus", "controller", "--port", str(port), "--redis-url", redis_url],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, what="controller /healthz")
        assert httpx.post(f"{base}/lookup", json={"tokens": [1]}).status_code == 401
        authorized = httpx.post(f"{base}/lookup", json={"tokens": [1]}, headers={"authorization": f"Bearer {TOKEN}"})
        assert authorized.status_code == 200
        assert TOKEN not in Path(f"/proc/{process.pid}/cmdline").read_text()
    finally:
        process.terminate()
        process.wait(20)
    assert "API token set" in log.read_text() and TOKEN not in log.read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.timeout(180)
def test_the_dashboard_asks_for_the_token_and_shows_the_fleet_with_it(redis_url: str, tmp_path: Path) -> None:
    from tests.integration.test_dashboard import rendered

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kvbus", "controller", "--port", str(port), "--redis-url", redis_url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, what="controller /healthz")
        asked = rendered(f"{base}/", tmp_path / "asked")
        assert asked.one("body").attrs["data-state"] == "token-required"
        assert "token required" in asked.one(id="connection").text()
        assert "hidden" not in asked.one("form", id="token-form").attrs
        shown = rendered(f"{base}/#token={TOKEN}", tmp_path / "given")
        assert shown.one("body").attrs["data-state"] == "live"
        assert shown.one(id="connection").text().startswith("live"), shown.one(id="connection").text()
        assert "hidden" in shown.one("form", id="token-form").attrs
    finally:
        process.terminate()
        process.wait(20)


def test_the_seeds_flow_works_with_a_token_as_lmcache_clients_send_it(locked: TestClient, agent: Agent) -> None:
    store(agent, SEED_TOKENS)
    bearer = {"authorization": f"Bearer {TOKEN}"}
    lookup = locked.post("/lookup", json={"tokens": SEED_TOKENS}, headers=bearer)
    assert lookup.status_code == 200 and lookup.json()["layout_info"] == {INSTANCE: [CPU["location"], 12]}
    cleared = locked.post("/clear", json=CPU, headers=bearer)
    assert cleared.status_code == 200 and cleared.json()["num_tokens"] == 12
    assert locked.post("/lookup", json={"tokens": SEED_TOKENS}, headers=bearer).json()["layout_info"] == {}
    assert locked.post("/lookup", json={"tokens": SEED_TOKENS}).status_code == 401
