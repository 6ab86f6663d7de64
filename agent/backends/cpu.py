"""LocalCPUBackend: chunks in host memory, pinned when a GPU will copy them back."""

from __future__ import annotations

import torch

from kvbus.agent.backends.base import IndexListener
from kvbus.agent.backends.memory import TensorLRUBackend
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location


class LocalCPUBackend(TensorLRUBackend):
    location = Location.CPU

    def __init__(self, space: HashSpace, capacity_bytes: int, listener: IndexListener | None = None) -> None:
        # Pinned pages speed host-to-GPU copies but are pointless, and on some hosts fail, without CUDA.
        super().__init__(
            space, capacity_bytes, torch.device("cpu"), pin_memory=torch.cuda.is_available(), listener=listener
        )
