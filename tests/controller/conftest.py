"""The controller app in process: each test module supplies its own `config` fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from kvbus.controller.app import create_app
from kvbus.shared.config import KVBusConfig


@pytest.fixture
def client(config: KVBusConfig) -> Iterator[TestClient]:
    with TestClient(create_app(config)) as test_client:
        yield test_client
