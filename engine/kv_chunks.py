"""The model's per-layer KV cut into the agent's chunks and glued back: LMCache's KV_2LTD layout.

A chunk is one tensor [2 (K, V), layers, chunk tokens, kv_heads * head_dim], a copy that owns
its memory, so the agent can keep it after the request's cache is gone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvbus.engine.model import LayerKV, ModelShape
from kvbus.shared.hashing import Chunk


def cut(kvs: Sequence[LayerKV], chunks: Sequence[Chunk]) -> list[torch.Tensor]:
    """One KV_2LTD tensor per chunk, for the token ranges the chunks cover."""
    if not chunks:
        return []
    keys = torch.stack([kv.keys for kv in kvs])  # [L, H, T, D]
    values = torch.stack([kv.values for kv in kvs])
    both = torch.stack((keys, values)).permute(0, 1, 3, 2, 4)  # [2, L, T, H, D]
    flat = both.reshape(*both.shape[:3], -1)
    return [flat[:, :, c.start : c.end].contiguous() for c in chunks]


def glue(tensors: Sequence[torch.Tensor], num_tokens: int, shape: ModelShape) -> list[LayerKV]:
    """Per-layer KV of the first `num_tokens` tokens that the chunks, in order, cover."""
    # The model runs on the CPU; chunks may come back from LocalGPUBackend (local_gpu).
    joined = torch.cat([t.to("cpu") for t in tensors], dim=2)[:, :, :num_tokens]
    if joined.shape[2] != num_tokens:
        raise ValueError(f"chunks cover {joined.shape[2]} tokens, {num_tokens} asked")
    split = joined.reshape(2, shape.num_layers, num_tokens, shape.num_kv_heads, shape.head_dim).permute(0, 1, 3, 2, 4)
    return [LayerKV(split[0, i].contiguous(), split[1, i].contiguous()) for i in range(shape.num_layers)]
