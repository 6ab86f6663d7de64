"""Which backends a config turns on, in which order, and the refusal of a GPU tier without CUDA."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kvbus.agent.backends import GB, make_backends
from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.backends.disk import LocalDiskBackend
from kvbus.agent.backends.gpu import LocalGPUBackend
from kvbus.shared.config import ConfigError, KVBusConfig, check_devices
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import FASTEST_FIRST, Location

SPACE = HashSpace("test/model", chunk_size=4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def test_the_defaults_build_one_cpu_backend() -> None:
    backends = make_backends(KVBusConfig(), SPACE, None)
    assert [type(b) for b in backends] == [LocalCPUBackend]
    assert backends[0].capacity_bytes == 5 * GB


def test_cpu_and_disk_come_fastest_first(tmp_path: Path) -> None:
    config = KVBusConfig(local_disk=str(tmp_path), max_local_disk_size=0.001)
    locations = [b.location for b in make_backends(config, SPACE, None)]
    assert locations == [Location.CPU, Location.DISK]
    assert locations == [loc for loc in FASTEST_FIRST if loc in locations]


@needs_cuda
def test_local_gpu_builds_a_gpu_backend_ahead_of_the_cpu(tmp_path: Path) -> None:
    config = KVBusConfig(local_gpu=True, max_local_gpu_size=0.001, local_disk=str(tmp_path), max_local_disk_size=0.001)
    backends = make_backends(config, SPACE, None)
    assert [type(b) for b in backends] == [LocalGPUBackend, LocalCPUBackend, LocalDiskBackend]
    assert [b.location for b in backends] == list(FASTEST_FIRST)
    gpu = backends[0]
    assert gpu.capacity_bytes == int(0.001 * GB)
    prompt = list(range(10))
    assert gpu.store(prompt, [torch.ones(len(prompt[i : i + 4]), 8) for i in range(0, 10, 4)]) == 10
    assert all(t.device.type == "cuda" for t in gpu.retrieve(prompt))
    assert gpu.clear() == 10


@needs_no_cuda
def test_local_gpu_without_cuda_is_a_one_line_config_error_naming_the_key() -> None:
    config = KVBusConfig(local_gpu=True)
    with pytest.raises(ConfigError) as caught:
        make_backends(config, SPACE, None)
    message = str(caught.value)
    assert message.startswith("local_gpu=True needs a CUDA device, but ")
    assert "built without CUDA" in message or "sees no CUDA device" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="local_gpu"):
        check_devices(config)


def test_a_gpu_tier_of_zero_gb_is_off_and_needs_no_device(caplog: pytest.LogCaptureFixture) -> None:
    config = KVBusConfig(local_gpu=True, max_local_gpu_size=0)
    check_devices(config)
    with caplog.at_level(logging.WARNING, logger="kvbus.agent.backends"):
        backends = make_backends(config, SPACE, None)
    assert [type(b) for b in backends] == [LocalCPUBackend]
    assert any("max_local_gpu_size is 0" in m for m in caplog.messages)
