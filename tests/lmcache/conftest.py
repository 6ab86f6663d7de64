"""The LMCache tier: kvbus's controller (from .venv) serving LMCache 0.5.6's worker protocol to real LMCache
engines and workers (from .venv-lmcache, made by `bash scripts/install-lmcache`), each test module with its own
redis-server. Tests that need real engines skip, saying why, where .venv-lmcache is missing or KVBUS_LMCACHE=0;
those with pyzmq fake workers run anyway."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import RedisServer, free_port
from tests.lmcache.stack import unavailable


@pytest.fixture(scope="module")
def lmcache_engines() -> None:
    """Skip unless real LMCache engines can run."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"LMCache tier skipped: {reason}")


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the module's own (stopped by pid)."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()
