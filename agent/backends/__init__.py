"""Storage backends and the factory that builds them from the config."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kvbus.agent.backends.base import IndexListener, StorageBackend
from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.backends.disk import LocalDiskBackend
from kvbus.agent.backends.gpu import LocalGPUBackend
from kvbus.shared.config import ConfigError, KVBusConfig, check_devices
from kvbus.shared.hashing import HashSpace

GB = 1024**3

log = logging.getLogger("kvbus.agent.backends")


def make_backends(
    config: KVBusConfig,
    space: HashSpace,
    listener: IndexListener | None,
    *,
    worker_id: int = 0,
    layout: str = "",
) -> list[StorageBackend]:
    """The backends the config turns on, fastest first (as `FASTEST_FIRST`): the first one that is not
    on disk is the memory tier, which takes every store at once.

    Raises ConfigError, naming the key, when a backend needs a device this process lacks.
    """
    check_devices(config)
    backends: list[StorageBackend] = []
    if config.local_gpu and config.max_local_gpu_size <= 0:
        log.warning("local_gpu is true but max_local_gpu_size is 0; no chunks go to the GPU")
    elif config.local_gpu:
        # Each worker's own device: vLLM sets the current device per rank before the connector builds its agent.
        backends.append(
            LocalGPUBackend(space, int(config.max_local_gpu_size * GB), listener, device=torch.cuda.current_device())
        )
    if config.local_cpu:
        backends.append(LocalCPUBackend(space, int(config.max_local_cpu_size * GB), listener))
    if config.local_disk and config.max_local_disk_size <= 0:
        log.warning("local_disk is %s but max_local_disk_size is 0; no chunks go to disk", config.local_disk)
    elif config.local_disk:
        backends.append(
            LocalDiskBackend(
                space, disk_directory(config, worker_id), int(config.max_local_disk_size * GB), listener, layout=layout
            )
        )
    return backends


def disk_directory(config: KVBusConfig, worker_id: int) -> Path:
    """Each worker of each instance gets a directory of its own under `local_disk`: one's clear or
    capacity must not delete another's files, and a restart finds its own files again.

    Raises ConfigError when the directory would lie outside `local_disk`. The config's rule for instance
    ids already keeps '..' and '/' out; this holds whatever the id, and also against a link under
    `local_disk` that leads elsewhere, since the backend deletes files it finds in its directory.
    """
    assert config.local_disk is not None
    directory = Path(config.local_disk) / config.lmcache_instance_id / f"worker-{worker_id}"
    root, resolved = Path(config.local_disk).resolve(), directory.resolve()
    if not resolved.is_relative_to(root):
        raise ConfigError(
            f"lmcache_instance_id={config.lmcache_instance_id!r} with local_disk={config.local_disk!r} puts "
            f"worker {worker_id}'s chunk files at {resolved}, outside local_disk"
        )
    return directory


__all__ = [
    "IndexListener",
    "LocalCPUBackend",
    "LocalDiskBackend",
    "StorageBackend",
    "disk_directory",
    "make_backends",
]
