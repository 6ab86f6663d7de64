"""Clients ride through a Redis restart: pooled connections that died are retried, pipelines included."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kvbus.shared import redis_conn
from tests.conftest import RedisServer, free_port


def test_sync_pipelines_survive_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        client = redis_conn.connect(server.url)
        assert client.ping()
        server.kill()
        server.start()
        pipe = client.pipeline(transaction=False)
        pipe.set("k", "w")
        pipe.get("k")
        assert pipe.execute() == [True, "w"]
        client.close()
    finally:
        server.kill()


def test_async_pipelines_survive_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)

    async def scenario() -> list[object]:
        client = redis_conn.connect_async(server.url)
        await asyncio.gather(*(client.ping() for _ in range(3)))  # several pooled connections
        server.kill()
        server.start()
        pipe = client.pipeline(transaction=False)
        pipe.set("k", "v")
        pipe.get("k")
        reply = list(await pipe.execute())
        await client.aclose()
        return reply

    server.start()
    try:
        assert asyncio.run(scenario()) == [True, "v"]
    finally:
        server.kill()
