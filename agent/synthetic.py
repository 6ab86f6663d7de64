"""Stand-in KV for the standalone agent: real tensors of a real size, derived from the chunk key.

Until an engine computes KV (the engine integrations do), the standalone agent needs
something to hold so that the seed flow (lookup, clear, lookup) can be scripted. Each
chunk's tensor is seeded from its key, so the same prompt always gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvbus.shared.hashing import HashSpace


@dataclass(frozen=True)
class KVShape:
    """Per token: K and V for each layer and KV head. Defaults are a tiny Llama-like model."""

    num_layers: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    dtype: torch.dtype = torch.float16


def synthetic_kv(space: HashSpace, tokens: Sequence[int], shape: KVShape = KVShape()) -> list[torch.Tensor]:
    """One tensor of shape (2, layers, chunk tokens, kv heads, head dim) per chunk of `tokens`."""
    tensors = []
    for chunk in space.chunks(tokens):
        generator = torch.Generator().manual_seed(int(chunk.key[:15], 16))
        tensors.append(
            torch.randn(
                (2, shape.num_layers, chunk.num_tokens, shape.num_kv_heads, shape.head_dim), generator=generator
            ).to(shape.dtype)
        )
    return tensors
