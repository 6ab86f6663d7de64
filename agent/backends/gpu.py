"""LocalGPUBackend: chunks kept in CUDA memory."""

from __future__ import annotations

import torch

from kvbus.agent.backends.base import IndexListener
from kvbus.agent.backends.memory import TensorLRUBackend
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location


class LocalGPUBackend(TensorLRUBackend):
    location = Location.GPU

    def __init__(
        self, space: HashSpace, capacity_bytes: int, listener: IndexListener | None = None, device: int = 0
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("LocalGPUBackend needs CUDA, and torch sees no CUDA device")
        super().__init__(space, capacity_bytes, torch.device("cuda", device), listener=listener)
