"""Redis client settings both sides use: short timeouts and few retries, so failures surface fast.

redis-py 8 retries 10 times with a 5 s socket timeout by default; a request would then hang
for a minute while Redis is down. Blocking readers get a socket timeout longer than their BLOCK.
A client that a request waits on (the vLLM scheduler's index reads) gets a far shorter bound.
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
# A healthy Redis answers in well under a millisecond; a request waits at most about this (one try)
# on a stalled one, and a slow answer only costs a cache miss.
REQUEST_PATH_TIMEOUT_S = 0.5


class _Options(TypedDict):
    socket_connect_timeout: float
    socket_timeout: float
    retry_on_error: list[type[Exception]]
    health_check_interval: int
    decode_responses: Literal[True]


def _options(blocking: bool, request_path: bool = False) -> _Options:
    if request_path:
        connect_timeout = timeout = REQUEST_PATH_TIMEOUT_S
    else:
        connect_timeout, timeout = CONNECT_TIMEOUT_S, COMMAND_TIMEOUT_S + (BLOCK_MS / 1000 if blocking else 0)
    return {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": timeout,
        # Without this, pipelines do not retry at all: after a Redis restart the first pipeline
        # on each pooled (now dead) connection would fail. Every pipeline kvbus sends is safe
        # to repeat: index writes are idempotent and duplicate results are ignored by event id.
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 15,
        "decode_responses": True,
    }


def connect(url: str, *, blocking: bool = False, request_path: bool = False) -> redis.Redis:
    """A sync client, for agent threads that must not touch the engine's event loop.

    `request_path`: for a caller a request waits on, which would rather miss than wait; each call
    is tried once, with REQUEST_PATH_TIMEOUT_S to connect and to read, instead of up to 3 x 5 s.
    """
    retry = redis.retry.Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 0 if request_path else 2)
    return redis.Redis.from_url(url, retry=retry, **_options(blocking, request_path))


def connect_async(url: str, *, blocking: bool = False) -> redis.asyncio.Redis:
    """An asyncio client, for the controller."""
    # The asyncio client needs the asyncio Retry: given the sync one it silently never retries.
    retry = redis.asyncio.retry.Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 2)
    return redis.asyncio.Redis.from_url(url, retry=retry, **_options(blocking))


def redacted(url: str) -> str:
    """The URL without its password, for logs and banners."""
    head, sep, tail = url.rpartition("@")
    return f"{head.split('://')[0]}://***@{tail}" if sep else url
