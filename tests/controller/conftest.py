"""The controller app in process: each test module supplies its own `config` fixture.

Every answer any controller test receives is checked against the schema /openapi.json gives for
its path and status, so the documented shapes cannot drift from what the routes return.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
from starlette.testclient import TestClient

from kvbus.agent.agent import Agent
from kvbus.controller import openapi
from kvbus.controller.app import create_app
from kvbus.shared.config import KVBusConfig
from tests.conftest import MODEL


@functools.cache
def _spec() -> dict[str, Any]:
    return openapi.spec()


def check_answer(method: str, url: str, response: httpx.Response) -> None:
    """Raise unless a JSON answer fits the schema documented for its path, method and status."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return
    body = json.loads(response.content)
    operation = _spec()["paths"].get(urlsplit(url).path, {}).get(method.lower())
    documented = (operation or {}).get("responses", {}).get(str(response.status_code))
    if documented is None:
        # Routing's own answers (unknown path, wrong method) are errors of the shared shape.
        schema: dict[str, Any] = {"$ref": "#/components/schemas/ErrorAnswer"}
    else:
        schema = documented["content"]["application/json"]["schema"]
    root = {**schema, "components": _spec()["components"]}
    jsonschema.Draft202012Validator(root).validate(body)


class CheckedClient(TestClient):
    def request(self, method: str, url: httpx.URL | str, *args: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        response = super().request(method, url, *args, **kwargs)
        check_answer(method, str(url), response)
        return response


@pytest.fixture
def client(config: KVBusConfig) -> Iterator[TestClient]:
    with CheckedClient(create_app(config)) as test_client:
        yield test_client


@pytest.fixture
def agent(config: KVBusConfig) -> Iterator[Agent]:
    """Worker 0 of the module's instance, serving commands on its threads."""
    running = Agent(config, model=MODEL)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def ranks(config: KVBusConfig) -> Iterator[list[Agent]]:
    """Two workers (tensor-parallel ranks) of the module's instance, each with its own agent."""
    agents = [Agent(config, model=MODEL, worker_id=rank) for rank in (0, 1)]
    for running in agents:
        running.start()
    yield agents
    for running in agents:
        running.stop()


@pytest.fixture
def silent(config: KVBusConfig) -> Agent:
    """Worker 0 of the module's instance, registered with its command group but never reading it."""
    unstarted = Agent(config, model=MODEL)
    unstarted.registration.register()
    unstarted.consumer.ensure_group()
    return unstarted
