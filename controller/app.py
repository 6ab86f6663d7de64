"""Builds the controller's Starlette app from explicit arguments; the lifespan owns Redis and the bus."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

import redis
import redis.asyncio
from redis.commands.core import AsyncScript
from starlette.applications import Starlette
from starlette.middleware import Middleware

from kvbus.controller import dashboard, event_ids, metrics
from kvbus.controller.bus import CommandBus
from kvbus.controller.deadlines import Deadlines
from kvbus.controller.errors import EXCEPTION_HANDLERS, REDIS_DOWN, UnknownInstance, credentials_problem
from kvbus.controller.event_ids import Operation
from kvbus.controller.guard import Guard
from kvbus.controller.lmcache.bridge import Bridge
from kvbus.controller.lookup import PrefixIndex
from kvbus.controller.reaper import Reaper
from kvbus.controller.routes import ROUTES
from kvbus.shared import redis_conn
from kvbus.shared.config import KVBusConfig
from kvbus.shared.locations import Location
from kvbus.shared.messages import CommandKind

log = logging.getLogger("kvbus.controller")

PROBE_TIMEOUT_S = 2.0  # start-up's check of Redis: long enough for a cold connection, short enough to not delay
# Connections opened at start-up: a first burst of this many concurrent requests pays no connects. A
# fresh controller's first 32 concurrent clears took 67-201 ms p50 against 20-40 ms once warm.
WARM_CONNECTIONS = 32
WARM_RUNS = 16  # CPython specializes a code path after 8 runs or so
WARM_TOKENS = 1024


async def _probe(client: redis_conn.AsyncClient, redis_url: str, scripts: list[AsyncScript]) -> None:
    """Say at start-up what is wrong with Redis, if anything: the controller starts all the same and serves
    503s until Redis answers, but a wrong password never fixes itself, so the log names the setting. When
    Redis answers, open the pool's connections and load the scripts, for the first requests' sake."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await client.ping()
            await redis_conn.warm(client, WARM_CONNECTIONS, scripts)
    except (redis.RedisError, TimeoutError) as exc:
        problem = credentials_problem(exc, redis_url)
        if problem is not None:
            log.error("%s; every request that needs Redis answers 503 redis_auth_failed until it is fixed", problem)
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else f"no answer in {PROBE_TIMEOUT_S:g} s"
            log.warning(
                "Redis at %s does not answer yet (%s); requests answer 503 until it does",
                redis_conn.redacted(redis_url),
                reason,
            )


async def _warm_paths(bus: CommandBus, index: PrefixIndex) -> None:
    """Run the lookup and command paths a few times before serving: CPython specializes code as it runs it,
    and the first requests would pay for it. The clears go to an instance no agent registers (this
    controller's own id), so they find it unknown and write nothing."""
    instance = f"kvbus-warm-up-{bus.controller_id}"
    with contextlib.suppress(*REDIS_DOWN, TimeoutError):
        for _ in range(WARM_RUNS):
            await index.lookup(range(WARM_TOKENS))
            with contextlib.suppress(UnknownInstance):
                await bus.request(
                    instance, CommandKind.CLEAR, event_ids.new(Operation.CLEAR), location=str(Location.CPU)
                )


def create_app(config: KVBusConfig) -> Starlette:
    """The controller; Redis connections open in its lifespan, so the app itself holds no state."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis_client = await redis_conn.connect_async(config.redis_url)
        reader_client = await redis_conn.connect_async(config.redis_url, blocking=True)
        bus = CommandBus(
            redis_client,
            reader_client,
            timeout_s=config.command_timeout,
            redis_timeout_s=config.redis_timeout,
            event_retention_s=config.event_retention,
            event_retention_count=config.event_retention_count,
        )
        app.state.config = config
        app.state.redis = redis_client
        app.state.bus = bus
        app.state.index = index = PrefixIndex(redis_client)
        await _probe(redis_client, config.redis_url, [*bus.scripts, *index.scripts])
        await bus.start()
        await _warm_paths(bus, index)
        # What start-up made lives as long as the process: no collection needs to scan it again.
        gc.freeze()
        bridge = Bridge(redis_client, config, controller_id=bus.controller_id)
        app.state.bridge = bridge
        await bridge.start()
        reaper = Reaper(redis_client, reap_after_s=config.reap_after)
        reaping = asyncio.create_task(reaper.run(), name="kvbus-reaper") if config.reap_after > 0 else None
        log.info(
            "controller %s ready on Redis at %s; results on %s",
            bus.controller_id,
            redis_conn.redacted(config.redis_url),
            bus.results_key,
        )
        if config.api_token is None:
            log.info("no API token set: anyone who reaches this port may use the API (set KVBUS_API_TOKEN)")
        else:
            log.info("API token set: every endpoint but /healthz and the dashboard page requires it")
        try:
            yield
        finally:
            reaper.stop()
            if reaping is not None:
                await reaping
            await bridge.stop()
            await bus.stop()
            await index.aclose()
            await redis_client.aclose()
            await reader_client.aclose()
            log.info("controller %s stopped", bus.controller_id)

    # Counters live as long as the app, not the process: tests and embedders create several apps.
    own_metrics = metrics.Metrics()
    app = Starlette(
        routes=[*ROUTES, *metrics.ROUTES, *dashboard.ROUTES],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[
            Middleware(metrics.MetricsMiddleware, metrics=own_metrics),
            Middleware(Guard, token=config.api_token),
            Middleware(Deadlines, redis_timeout_s=config.redis_timeout, command_timeout_s=config.command_timeout),
        ],
        lifespan=lifespan,
    )
    app.state.metrics = own_metrics
    return app
