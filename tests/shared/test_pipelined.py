"""The pipelined connection the controller sends its scripts and reads its results over, against real Redis
servers: each caller gets its own reply in order, errors typed as redis-py types them, a caller that stops
waiting does not shift the replies of the others, and a lost or stalled connection fails its callers and is
replaced at the next call."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.exceptions

from kvbus.shared import redis_conn
from kvbus.shared.pipelined import Pipelined
from kvbus.shared.resp import pack
from tests.conftest import RedisServer

T = TypeVar("T")


def _with_pipelined(url: str, scenario: Callable[[Pipelined, redis.asyncio.Redis], Awaitable[T]]) -> T:
    async def run() -> T:
        client = await redis_conn.connect_async(url)
        assert isinstance(client, redis.asyncio.Redis)
        pipelined = Pipelined(client.connection_pool)
        try:
            return await scenario(pipelined, client)
        finally:
            await pipelined.aclose()
            await client.aclose()

    return asyncio.run(run())


def test_concurrent_callers_each_get_their_own_reply_and_errors_come_typed(redis_server: RedisServer) -> None:
    async def scenario(pipelined: Pipelined, client: redis.asyncio.Redis) -> list[Any]:
        await client.set("pipelined:text", "a string")

        async def one(n: int) -> Any:
            if n % 50 == 7:
                return await pipelined.call(pack(("LPUSH", "pipelined:text", n)))  # WRONGTYPE
            if n % 50 == 8:
                return await pipelined.call(pack(("EVALSHA", "0" * 40, 0)))  # NOSCRIPT
            return await pipelined.call(pack(("ECHO", f"reply-{n}")))

        return await asyncio.gather(*(one(n) for n in range(400)), return_exceptions=True)

    replies = _with_pipelined(redis_server.url, scenario)
    for n, reply in enumerate(replies):
        if n % 50 == 7:
            assert type(reply) is redis.ResponseError and "WRONGTYPE" in str(reply)
        elif n % 50 == 8:
            assert isinstance(reply, redis.exceptions.NoScriptError)
        else:
            assert reply == f"reply-{n}"


def test_a_caller_that_stops_waiting_leaves_the_others_their_own_replies(redis_server: RedisServer) -> None:
    async def scenario(pipelined: Pipelined, client: redis.asyncio.Redis) -> tuple[bool, list[Any]]:
        await client.delete("pipelined:empty")
        timed_out = False
        try:
            async with asyncio.timeout(0.2):
                await pipelined.call(pack(("BLPOP", "pipelined:empty", 1)))  # answers nil after 1 s
        except TimeoutError:
            timed_out = True
        # Sent behind the abandoned BLPOP: its nil reply comes first and must go nowhere.
        return timed_out, await asyncio.gather(*(pipelined.call(pack(("ECHO", n))) for n in range(3)))

    timed_out, replies = _with_pipelined(redis_server.url, scenario)
    assert timed_out
    assert replies == ["0", "1", "2"]


def test_a_script_is_loaded_where_redis_lost_it(redis_server: RedisServer) -> None:
    async def scenario(pipelined: Pipelined, client: redis.asyncio.Redis) -> list[Any]:
        script = client.register_script("return {KEYS[1], ARGV[1]}")
        first = await pipelined.run_script(script, ["k"], ["v"])
        await client.script_flush()
        return [first, await pipelined.run_script(script, ["k"], ["w"])]

    assert _with_pipelined(redis_server.url, scenario) == [["k", "v"], ["k", "w"]]


def test_the_connection_outlives_the_collection_of_the_client_object_that_opened_it(
    redis_server: RedisServer,
) -> None:
    """redis-py's connection object opened the socket; collecting it must not close what was taken over."""

    async def scenario(pipelined: Pipelined, client: redis.asyncio.Redis) -> list[Any]:
        first = await pipelined.call(pack(("ECHO", "before")))
        gc.collect()
        await asyncio.sleep(0.05)
        ids = {await pipelined.call(pack(("CLIENT", "ID"))) for _ in range(3)}
        return [first, await pipelined.call(pack(("ECHO", "after"))), len(ids)]

    assert _with_pipelined(redis_server.url, scenario) == ["before", "after", 1]


def test_a_killed_connection_is_replaced_and_its_caller_retried_once(redis_server: RedisServer) -> None:
    async def scenario(pipelined: Pipelined, client: redis.asyncio.Redis) -> list[Any]:
        before = await pipelined.call(pack(("CLIENT", "ID")))
        await client.client_kill_filter(_id=before)
        await asyncio.sleep(0.05)  # the loop sees the connection close
        after = await pipelined.call(pack(("CLIENT", "ID")))
        # Killed while a command waits on it: that command fails over to a new connection and is answered.
        blocked = asyncio.ensure_future(pipelined.call(pack(("BLPOP", "pipelined:never", 0.5))))
        await asyncio.sleep(0.1)
        await client.client_kill_filter(_id=after)
        return [before != after, await blocked, await pipelined.call(pack(("ECHO", "still here")))]

    assert _with_pipelined(redis_server.url, scenario) == [True, None, "still here"]


def _through_a_stall(
    server: RedisServer,
    socket_timeout_s: float,
    timeout_s: float | None,
    stalled: Callable[[Pipelined], Awaitable[T]],
) -> tuple[T, Any]:
    """A Pipelined on `server` (a PING first), `stalled(pipelined)` while Redis is stopped, then one more call
    once it is back: what `stalled` returned and that call's reply."""

    async def run() -> tuple[T, Any]:
        client = redis.asyncio.Redis.from_url(server.url, decode_responses=True, socket_timeout=socket_timeout_s)
        pipelined = Pipelined(client.connection_pool, timeout_s=timeout_s)
        try:
            assert await pipelined.call(pack(("PING",))) == "PONG"
            server.pause()
            try:
                during = await stalled(pipelined)
            finally:
                server.resume()
            return during, await pipelined.call(pack(("ECHO", "back")))
        finally:
            await pipelined.aclose()
            await client.aclose()

    return asyncio.run(run())


def test_a_stalled_redis_fails_the_waiting_callers_after_the_socket_timeout_and_the_next_call_reconnects(
    stallable_redis: RedisServer,
) -> None:
    async def three(pipelined: Pipelined) -> tuple[list[Any], float]:
        started = time.monotonic()
        stalled = await asyncio.gather(*(pipelined.call(pack(("ECHO", n))) for n in range(3)), return_exceptions=True)
        return stalled, time.monotonic() - started

    (stalled, waited), back = _through_a_stall(stallable_redis, 0.5, None, three)
    assert all(isinstance(error, redis.TimeoutError) for error in stalled)
    assert 0.4 < waited < 2.0
    assert back == "back"


def test_its_own_timeout_bounds_a_reply_and_a_reconnect_to_a_stalled_redis_short_of_the_socket_timeout(
    stallable_redis: RedisServer,
) -> None:
    async def timed(call: Awaitable[Any]) -> tuple[Any, float]:
        started = time.monotonic()
        try:
            return await call, time.monotonic() - started
        except redis.RedisError as exc:
            return exc, time.monotonic() - started

    async def two(pipelined: Pipelined) -> list[tuple[Any, float]]:
        # The first waits on the open connection; the second on a new one, whose handshake gets no answer.
        return [await timed(pipelined.call(pack(("ECHO", n)))) for n in range(2)]

    [(stalled, waited), (reopening, reopen_waited)], back = _through_a_stall(stallable_redis, 5.0, 0.3, two)
    assert isinstance(stalled, redis.TimeoutError) and 0.25 < waited < 1.0
    assert isinstance(reopening, redis.TimeoutError) and "connecting" in str(reopening) and reopen_waited < 1.0
    assert back == "back"


def test_a_closed_connection_fails_its_callers_and_does_not_reopen(redis_server: RedisServer) -> None:
    async def scenario(pipelined: Pipelined, client: redis.asyncio.Redis) -> list[Any]:
        waiting = asyncio.ensure_future(pipelined.call(pack(("BLPOP", "pipelined:never", 1))))
        await asyncio.sleep(0.05)
        await pipelined.aclose()
        after = await asyncio.gather(pipelined.call(pack(("PING",))), return_exceptions=True)
        return [await asyncio.gather(waiting, return_exceptions=True), after]

    (waited,), (after,) = _with_pipelined(redis_server.url, scenario)
    assert isinstance(waited, redis.ConnectionError) and isinstance(after, redis.ConnectionError)


def test_a_batch_goes_in_one_write_and_an_error_reply_in_it_is_raised_once_every_reply_is_in(
    redis_server: RedisServer,
) -> None:
    async def scenario(pipelined: Pipelined, client: redis.asyncio.Redis) -> list[Any]:
        await client.set("pipelined:text", "a string")
        await client.delete("pipelined:set")
        replies = [
            await pipelined.batch([pack(("SADD", "pipelined:set", "a", "b")), pack(("SMEMBERS", "pipelined:set"))])
        ]
        refused = await asyncio.gather(
            pipelined.batch(
                [
                    pack(("SADD", "pipelined:set", "c")),
                    pack(("SADD", "pipelined:text", "x")),
                    pack(("SCARD", "pipelined:set")),
                ]
            ),
            return_exceptions=True,
        )
        replies.append(refused[0])
        replies.append(await pipelined.call(pack(("SCARD", "pipelined:set"))))  # nothing of the batch left unread
        return replies

    added, refused, count = _with_pipelined(redis_server.url, scenario)
    assert added[0] == 2 and sorted(added[1]) == ["a", "b"]
    assert type(refused) is redis.ResponseError and "WRONGTYPE" in str(refused)
    assert count == 3  # the command after the refused one ran too


def test_a_reply_no_command_waits_for_fails_the_connection_and_the_next_call_reconnects(
    redis_server: RedisServer,
) -> None:
    """Replies that can no longer be matched to commands must not be handed to the wrong callers."""

    async def scenario(pipelined: Pipelined, client: redis.asyncio.Redis) -> list[Any]:
        first = await pipelined.call(pack(("CLIENT", "ID")))
        protocol = pipelined._protocol
        assert protocol is not None
        protocol.transport.write(pack(("PING",)))  # behind the pipelined connection's back
        await asyncio.sleep(0.1)
        return [protocol.lost is not None, first != await pipelined.call(pack(("CLIENT", "ID")))]

    assert _with_pipelined(redis_server.url, scenario) == [True, True]


class _SilencingProxy:
    """A TCP relay to Redis that can go silent on the connections it carries, keeping them open, as a
    firewall or NAT that dropped them would; connections made after that are relayed as before."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._live: list[asyncio.StreamWriter] = []
        self._silenced: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.accepted = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    def silence(self) -> None:
        self._silenced.update(self._live)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._live.append(writer)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if writer not in self._silenced:
                    sink.write(data)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)

    async def stop(self) -> None:
        assert self.server is not None
        for writer in self._live:
            writer.close()
        self.server.close()


def test_a_connection_quiet_past_the_health_check_interval_is_replaced_before_its_next_command(
    redis_server: RedisServer,
) -> None:
    async def scenario() -> tuple[type[BaseException] | None, Any, float, int]:
        proxy = _SilencingProxy(redis_server.port)
        url = await proxy.start()
        client = redis.asyncio.Redis.from_url(url, decode_responses=True, socket_timeout=0.5, health_check_interval=1)
        pipelined = Pipelined(client.connection_pool)
        try:
            assert await pipelined.call(pack(("PING",))) == "PONG"
            proxy.silence()
            # Used again at once, the dropped connection is trusted: its command fails after the socket timeout.
            try:
                await pipelined.call(pack(("PING",)))
                unanswered: type[BaseException] | None = None
            except redis.TimeoutError as exc:
                unanswered = type(exc)
            assert await pipelined.call(pack(("PING",))) == "PONG"
            proxy.silence()
            await asyncio.sleep(1.1)
            started = time.monotonic()
            after_quiet = await pipelined.call(pack(("ECHO", "after a quiet spell")))
            return unanswered, after_quiet, time.monotonic() - started, proxy.accepted
        finally:
            await pipelined.aclose()
            await client.aclose()
            await proxy.stop()

    unanswered, after_quiet, waited, accepted = asyncio.run(scenario())
    assert unanswered is redis.TimeoutError
    assert after_quiet == "after a quiet spell"
    assert waited < 0.4  # a new connection, not the socket timeout on the silent one
    assert accepted == 3
