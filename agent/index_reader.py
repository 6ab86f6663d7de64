"""How much of a prompt one rank of an instance holds, read from that rank's Redis index by a process
that holds no KV (the engine's scheduler), in one round trip.

The scheduler runs the engine's loop, so a Redis that is slow or gone must cost it little: any
error counts as a miss, and after one the reader answers "nothing held" without asking for
`backoff_s`, so that at most one request per backoff pays the timeout. That timeout is the client's:
give the reader `redis_conn.connect(url, request_path=True)` (one try of 0.5 s; a stalled Redis cost
the agent's default client 15 s).
"""

from __future__ import annotations

import logging
import time

from kvbus.agent.paged_blocks import Layout
from kvbus.shared import keys, redis_conn
from kvbus.shared.flat_fields import DecodeError
from kvbus.shared.locations import Location
from kvbus.shared.records import WorkerRecord

log = logging.getLogger("kvbus.agent.index_reader")


class IndexReader:
    def __init__(
        self,
        client: redis_conn.Client,
        instance_id: str,
        *,
        worker_id: int,
        location: Location,
        layout: Layout,
        backoff_s: float = 5.0,
    ) -> None:
        self._redis = client
        self._index = keys.index(instance_id, worker_id, location)
        self._worker = keys.worker(instance_id, worker_id)
        self._layout = layout
        self._backoff_s = backoff_s
        self._paused_until = 0.0
        self._warned_layout: str | None = None

    def held(self, chunk_keys: list[str]) -> int:
        """How many of `chunk_keys`, from the first, this reader's rank holds in blocks of its layout."""
        if time.monotonic() < self._paused_until:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._worker)
        pipe.hmget(self._index, chunk_keys)
        try:
            worker, counts = pipe.execute()
        except redis_conn.ERRORS as exc:
            self._paused_until = time.monotonic() + self._backoff_s
            log.warning("index lookup failed (%s); counting misses for %.0f s", exc, self._backoff_s)
            return 0
        if not self._compatible(_layout(worker)):
            return 0
        held = 0
        for count in counts:
            if count is None:
                break
            held += 1
        return held

    def _compatible(self, registered: str | None) -> bool:
        if registered is None:
            return False  # the worker has not registered yet, or is gone: nothing it holds is reachable
        try:
            compatible = Layout.parse(registered).compatible(self._layout)
        except ValueError:
            compatible = False
        if not compatible and registered != self._warned_layout:
            self._warned_layout = registered
            log.warning(
                "%s stores blocks of layout %r, not %s: its chunks are not loaded here",
                self._worker,
                registered,
                self._layout,
            )
        return compatible


def _layout(fields: dict[str, str]) -> str | None:
    """The layout the worker registered; None when it has not registered, is gone, or is unreadable."""
    try:
        return WorkerRecord.decode(fields).layout if fields else None
    except DecodeError:
        return None
