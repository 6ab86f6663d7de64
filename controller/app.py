"""Builds the controller's Starlette app from explicit arguments; the lifespan owns Redis and the bus."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware

from kvbus.controller import dashboard, metrics
from kvbus.controller.bus import CommandBus
from kvbus.controller.errors import EXCEPTION_HANDLERS
from kvbus.controller.lmcache.bridge import Bridge
from kvbus.controller.lookup import PrefixIndex
from kvbus.controller.reaper import Reaper
from kvbus.controller.routes import ROUTES
from kvbus.shared import redis_conn
from kvbus.shared.config import KVBusConfig

log = logging.getLogger("kvbus.controller")


def create_app(config: KVBusConfig) -> Starlette:
    """The controller; Redis connections open in its lifespan, so the app itself holds no state."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis_client = redis_conn.connect_async(config.redis_url)
        reader_client = redis_conn.connect_async(config.redis_url, blocking=True)
        bus = CommandBus(
            redis_client, reader_client, timeout_s=config.command_timeout, event_retention_s=config.event_retention
        )
        app.state.config = config
        app.state.redis = redis_client
        app.state.bus = bus
        app.state.index = PrefixIndex(redis_client)
        await bus.start()
        bridge = Bridge(redis_client, config, controller_id=bus.controller_id)
        app.state.bridge = bridge
        await bridge.start()
        reaper = Reaper(redis_client, reap_after_s=config.reap_after)
        reaping = asyncio.create_task(reaper.run(), name="kvbus-reaper") if config.reap_after > 0 else None
        log.info("controller %s ready; results on %s", bus.controller_id, bus.results_key)
        try:
            yield
        finally:
            reaper.stop()
            if reaping is not None:
                await reaping
            await bridge.stop()
            await bus.stop()
            await redis_client.aclose()
            await reader_client.aclose()
            log.info("controller %s stopped", bus.controller_id)

    # Counters live as long as the app, not the process: tests and embedders create several apps.
    own_metrics = metrics.Metrics()
    app = Starlette(
        routes=[*ROUTES, *metrics.ROUTES, *dashboard.ROUTES],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(metrics.MetricsMiddleware, metrics=own_metrics)],
        lifespan=lifespan,
    )
    app.state.metrics = own_metrics
    return app
