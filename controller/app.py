"""Builds the controller's Starlette app from explicit arguments; the lifespan owns Redis and the bus."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import msgspec
import redis
import redis.asyncio
from redis.commands.core import AsyncScript
from starlette.applications import Starlette
from starlette.middleware import Middleware

from kvbus.controller import dashboard, metrics, rehearsal
from kvbus.controller.bus import CommandBus
from kvbus.controller.deadlines import Deadlines
from kvbus.controller.errors import EXCEPTION_HANDLERS, credentials_problem
from kvbus.controller.guard import Guard
from kvbus.controller.lmcache.bridge import Bridge
from kvbus.controller.lookup import PrefixIndex
from kvbus.controller.reaper import Reaper
from kvbus.controller.routes import ROUTES
from kvbus.shared import redis_conn
from kvbus.shared.config import KVBusConfig
from kvbus.shared.locations import Location

log = logging.getLogger("kvbus.controller")

PROBE_TIMEOUT_S = 2.0  # start-up's check of Redis: long enough for a cold connection, short enough to not delay
# Connections opened at start-up: a first burst of this many concurrent requests pays no connects. A
# fresh controller's first 32 concurrent clears took 67-201 ms p50 against 20-40 ms once warm.
WARM_CONNECTIONS = 32
# The rehearsal's lookups and clears, this many of each over WARM_CONNECTIONS connections at once: CPython
# specializes a code path after 8 runs or so, and a first burst finds the memory of that many requests in flight.
WARM_RUNS = 64
WARM_TOKENS = 1024


async def _probe(client: redis_conn.AsyncClient, redis_url: str, scripts: list[AsyncScript]) -> bool:
    """Say at start-up what is wrong with Redis, if anything: the controller starts all the same and serves
    503s until Redis answers, but a wrong password never fixes itself, so the log names the setting. When
    Redis answers, open the pool's connections and load the scripts, for the first requests' sake; True then."""
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
        return False
    return True


async def _rehearse(app: Starlette, config: KVBusConfig, controller_id: str) -> None:
    """Lookups and clears through the HTTP path, to a twin of `app` (rehearsal.py says why). The clears go to an
    instance no agent registers (this controller's own id), so they find it unknown and write nothing."""
    twin = _starlette(config, metrics.Metrics(), lifespan=None)
    twin.state = app.state
    lookup = rehearsal.post("/lookup", msgspec.json.encode({"tokens": list(range(WARM_TOKENS))}), config.api_token)
    clear = rehearsal.post(
        "/clear",
        msgspec.json.encode({"instance_id": f"kvbus-warm-up-{controller_id}", "location": str(Location.CPU)}),
        config.api_token,
    )
    started = time.perf_counter()
    try:
        statuses = await rehearsal.rehearse(twin, [lookup, clear] * WARM_RUNS, connections=WARM_CONNECTIONS)
    except (OSError, EOFError, TimeoutError) as exc:
        log.warning("start-up's rehearsal of the HTTP path stopped (%s); the first requests may be slower", exc)
        return
    if set(statuses) != {200, 404}:
        log.warning("start-up's rehearsal of the HTTP path got statuses %s, not 200 and 404", sorted(set(statuses)))
    log.debug("rehearsed the HTTP path: %d requests in %.1f ms", len(statuses), (time.perf_counter() - started) * 1000)


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
        redis_answers = await _probe(redis_client, config.redis_url, [*bus.scripts, *index.scripts])
        await bus.start()
        if redis_answers:  # otherwise every rehearsed request would be a 503, and each one a log line
            await _rehearse(app, config, bus.controller_id)
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
    return _starlette(config, metrics.Metrics(), lifespan)


def _starlette(
    config: KVBusConfig,
    own_metrics: metrics.Metrics,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None,
) -> Starlette:
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
