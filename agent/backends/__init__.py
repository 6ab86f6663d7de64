"""Storage backends and the factory that builds them from the config."""

from __future__ import annotations

from kvbus.agent.backends.base import IndexListener, StorageBackend
from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.shared.config import KVBusConfig
from kvbus.shared.hashing import HashSpace

GB = 1024**3


def make_backends(config: KVBusConfig, space: HashSpace, listener: IndexListener | None) -> list[StorageBackend]:
    """The backends the config turns on, fastest first."""
    backends: list[StorageBackend] = []
    if config.local_cpu:
        backends.append(LocalCPUBackend(space, int(config.max_local_cpu_size * GB), listener))
    return backends


__all__ = ["IndexListener", "LocalCPUBackend", "StorageBackend", "make_backends"]
