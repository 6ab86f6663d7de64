"""Clients ride through a Redis restart: pooled connections that died are retried, pipelines included;
a request-path client gives up on a stalled Redis within its short bound."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio

from kvbus.shared import redis_conn
from kvbus.shared.pipelined import Pipelined
from tests.conftest import RedisServer, free_port


@pytest.mark.parametrize("request_path", [False, True], ids=["agent", "request-path"])
def test_sync_pipelines_survive_a_redis_restart(tmp_path: Path, request_path: bool) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        client = redis_conn.connect(server.url, request_path=request_path)
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
        client = await redis_conn.connect_async(server.url)
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


def test_a_request_path_client_gives_up_on_a_stalled_redis_within_its_bound(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    assert server.process is not None
    client = redis_conn.connect(server.url, request_path=True)
    fresh = redis_conn.connect(server.url, request_path=True)  # its first connection opens mid-stall
    try:
        assert client.ping()
        os.kill(server.process.pid, signal.SIGSTOP)
        for caller in (client, fresh):
            started = time.monotonic()
            pipe = caller.pipeline(transaction=False)
            pipe.get("k")
            with pytest.raises(redis.TimeoutError):
                pipe.execute()
            assert time.monotonic() - started < redis_conn.REQUEST_PATH_TIMEOUT_S + 0.5
        os.kill(server.process.pid, signal.SIGCONT)
        assert client.set("k", "v") and fresh.get("k") == "v"
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        client.close()
        fresh.close()
        server.kill()


def test_a_script_call_rides_through_a_redis_restart_that_lost_its_scripts(tmp_path: Path) -> None:
    """The controller's send path: after a restart its pipelined connection is dead and the script is gone;
    the call reconnects, loads the script and answers, as the client's own script call would."""
    server = RedisServer(free_port(), tmp_path)

    async def scenario() -> list[object]:
        client = await redis_conn.connect_async(server.url)
        via = redis_conn.scripts_via(client)
        assert isinstance(via, Pipelined)
        script = client.register_script("redis.call('SET', KEYS[1], ARGV[1]) return {KEYS[1], ARGV[1], #ARGV}")
        replies = [await redis_conn.run_script(via, script, ["k"], ["v", 7], None)]
        server.kill()
        server.start()  # keeps nothing: its script cache is empty, the old connection dead
        replies.append(await redis_conn.run_script(via, script, ["k"], ["w", 8], None))
        replies.append(await client.get("k"))
        await via.aclose()
        await client.aclose()
        return replies

    server.start()
    try:
        assert asyncio.run(scenario()) == [["k", "v", 2], ["k", "w", 2], "w"]
    finally:
        server.kill()
