"""Redis client settings both sides use: short timeouts and few retries, so failures surface fast.

redis-py 8 retries 10 times with a 5 s socket timeout by default; a request would then hang
for a minute while Redis is down. Blocking readers get a socket timeout longer than their BLOCK.
"""

from __future__ import annotations

import redis
import redis.asyncio
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
BLOCK_MS = 1000  # XREAD/XREADGROUP BLOCK; kept well under the reader's socket timeout


def _options(blocking: bool) -> dict[str, object]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": COMMAND_TIMEOUT_S + (BLOCK_MS / 1000 if blocking else 0),
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 2),
        "health_check_interval": 15,
        "decode_responses": True,
    }


def connect(url: str, *, blocking: bool = False) -> redis.Redis:
    """A sync client, for agent threads that must not touch the engine's event loop."""
    return redis.Redis.from_url(url, **_options(blocking))  # type: ignore[arg-type]


def connect_async(url: str, *, blocking: bool = False) -> redis.asyncio.Redis:
    """An asyncio client, for the controller."""
    return redis.asyncio.Redis.from_url(url, **_options(blocking))  # type: ignore[arg-type]
