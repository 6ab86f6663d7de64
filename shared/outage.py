"""One loop's view of a Redis outage: say once that it began, back off while it lasts, say when it ends.

Every long-running loop that talks to Redis (the controller's result reader, the agent's
heartbeat, command and index threads) keeps one. A loop that logged every failed try would
fill its log during an outage; one that logged none would leave the operator guessing.
"""

from __future__ import annotations

import logging


class Outage:
    def __init__(self, log: logging.Logger, what: str, *, backoff_s: float, max_backoff_s: float | None = None) -> None:
        self._log = log
        self._what = what
        self._first_backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s if max_backoff_s is not None else backoff_s
        self._backoff_s = backoff_s
        self.ongoing = False

    def failed(self, exc: BaseException) -> float:
        """Note a failed try; returns how long to wait before the next one (doubling up to the maximum)."""
        if not self.ongoing:
            self._log.warning("%s failing (%s); retrying", self._what, exc)
            self.ongoing = True
            return self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)
        return self._backoff_s

    def succeeded(self) -> None:
        """Note a successful try; logs the recovery if an outage was ongoing."""
        if self.ongoing:
            self._log.info("%s recovered", self._what)
            self.ongoing = False
            self._backoff_s = self._first_backoff_s
