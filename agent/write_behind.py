"""WriteBehind: stores copied to a LocalDiskBackend on a thread of its own, so no engine waits on the disk."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import torch

from kvbus.agent.backends.disk import LocalDiskBackend

log = logging.getLogger("kvbus.agent.backends")

_DROP_WARN_INTERVAL_S = 10.0


class _Pending(NamedTuple):
    tokens: tuple[int, ...]
    kv: tuple[torch.Tensor, ...]
    nbytes: int
    epoch: int


class WriteBehind:
    """Copies stores to a LocalDiskBackend on one thread, so an engine never waits on the disk.

    The queue is bounded in bytes. When it is full the disk copy of that store is dropped and
    counted, not waited for: the chunks are still in memory, and the disk catches the next store.
    The tensors handed in must not change afterwards (the tiers hand in their memory tier's copies).
    """

    def __init__(self, backend: LocalDiskBackend, max_pending_bytes: int) -> None:
        self.backend = backend
        self.max_pending_bytes = max_pending_bytes
        self.dropped = 0  # stores whose disk copy was dropped because the queue was full
        self._pending: deque[_Pending] = deque()
        self._pending_bytes = 0
        self._busy = False
        self._stopping = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._last_warning = -_DROP_WARN_INTERVAL_S

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvbus-disk-writer", daemon=True)
            self._thread.start()

    def submit(self, tokens: Sequence[int], kv: Sequence[torch.Tensor]) -> bool:
        """Queue a store for the disk; False (and counted in `dropped`) when the queue is full."""
        nbytes = sum(t.numel() * t.element_size() for t in kv)
        with self._changed:
            if self._pending_bytes + nbytes > self.max_pending_bytes or self._stopping:
                self.dropped += 1
                dropped = self.dropped
            else:
                self._pending.append(_Pending(tuple(tokens), tuple(kv), nbytes, self.backend.epoch))
                self._pending_bytes += nbytes
                self._changed.notify_all()
                return True
        now = time.monotonic()
        if now - self._last_warning >= _DROP_WARN_INTERVAL_S:
            self._last_warning = now
            log.warning(
                "%s: write-behind queue full (%d bytes pending); %d stores so far kept in memory only",
                self.backend.location,
                self.max_pending_bytes,
                dropped,
            )
        return False

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every store queued so far is on disk; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._busy, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most `timeout` seconds), then end the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._stopping)
                if not self._pending:
                    return
                item = self._pending.popleft()
                self._busy = True
            try:
                self.backend.store(item.tokens, item.kv, epoch=item.epoch)
            except Exception:  # noqa: BLE001 - one bad store must not end disk writes for the process
                log.exception("%s: write-behind store of %d tokens failed", self.backend.location, len(item.tokens))
            finally:
                with self._changed:
                    self._pending_bytes -= item.nbytes
                    self._busy = False
                    self._changed.notify_all()
