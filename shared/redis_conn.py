"""Redis client settings both sides use: short timeouts and few retries, so failures surface fast.

redis-py 8 retries 10 times with a 5 s socket timeout by default; a request would then hang
for a minute while Redis is down. Blocking readers get a socket timeout longer than their BLOCK.
"""

from __future__ import annotations

from typing import Literal, TypedDict

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import ExponentialWithJitterBackoff

CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
BLOCK_MS = 1000  # XREAD/XREADGROUP BLOCK; kept well under the reader's socket timeout


class _Options(TypedDict):
    socket_connect_timeout: float
    socket_timeout: float
    retry_on_error: list[type[Exception]]
    health_check_interval: int
    decode_responses: Literal[True]


def _options(blocking: bool) -> _Options:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": COMMAND_TIMEOUT_S + (BLOCK_MS / 1000 if blocking else 0),
        # Without this, pipelines do not retry at all: after a Redis restart the first pipeline
        # on each pooled (now dead) connection would fail. Every pipeline kvbus sends is safe
        # to repeat: index writes are idempotent and duplicate results are ignored by event id.
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 15,
        "decode_responses": True,
    }


def connect(url: str, *, blocking: bool = False) -> redis.Redis:
    """A sync client, for agent threads that must not touch the engine's event loop."""
    retry = redis.retry.Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 2)
    return redis.Redis.from_url(url, retry=retry, **_options(blocking))


def connect_async(url: str, *, blocking: bool = False) -> redis.asyncio.Redis:
    """An asyncio client, for the controller."""
    # The asyncio client needs the asyncio Retry: given the sync one it silently never retries.
    retry = redis.asyncio.retry.Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 2)
    return redis.asyncio.Redis.from_url(url, retry=retry, **_options(blocking))


def redacted(url: str) -> str:
    """The URL without its password, for logs and banners."""
    head, sep, tail = url.rpartition("@")
    return f"{head.split('://')[0]}://***@{tail}" if sep else url
