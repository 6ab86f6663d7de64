"""A tiny Llama-3-shaped decoder in plain torch, built from a fixed seed: no downloads, no transformers.

It has Llama-3's vocabulary, grouped-query attention, RoPE and SwiGLU, so its KV cache has the
shape of a real one, only smaller. The weights are random; what matters is that the same tokens
give the same KV and logits in every process, which is what cache reuse is checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 128256
    hidden: int = 256
    intermediate: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 500000.0
    max_model_len: int = 4096
    norm_eps: float = 1e-5
    dtype: torch.dtype = torch.float32

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


class LayerKV:
    """One layer's keys and values for a sequence: [kv_heads, tokens, head_dim] each, after RoPE."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys
        self.values = values

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[1])


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class _Attention(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        d = shape.head_dim
        self.q_proj = nn.Linear(shape.hidden, shape.num_heads * d, bias=False)
        self.k_proj = nn.Linear(shape.hidden, shape.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(shape.hidden, shape.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(shape.num_heads * d, shape.hidden, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: LayerKV | None
    ) -> tuple[torch.Tensor, LayerKV]:
        s, d = x.shape[0], self.shape.head_dim
        q = self.q_proj(x).view(s, self.shape.num_heads, d).transpose(0, 1)
        k = self.k_proj(x).view(s, self.shape.num_kv_heads, d).transpose(0, 1)
        v = self.v_proj(x).view(s, self.shape.num_kv_heads, d).transpose(0, 1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past is not None and past.num_tokens:
            k = torch.cat((past.keys, k), dim=1)
            v = torch.cat((past.values, v), dim=1)
        kv = LayerKV(k, v)
        offset = k.shape[1] - s
        # A batch dimension of 1 lets CPU torch use its fused (flash) kernel instead of the math path.
        q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if offset == 0:
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)
        else:
            # Queries sit after `offset` cached positions: each sees the cache and its own past.
            allowed = torch.arange(k.shape[1]).unsqueeze(0) <= (torch.arange(s) + offset).unsqueeze(1)
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=allowed, enable_gqa=True)
        out = out.squeeze(0)
        return self.o_proj(out.transpose(0, 1).reshape(s, -1)), kv


class _Block(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.input_norm = _RMSNorm(shape.hidden, shape.norm_eps)
        self.attn = _Attention(shape)
        self.post_norm = _RMSNorm(shape.hidden, shape.norm_eps)
        self.gate = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.up = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.down = nn.Linear(shape.intermediate, shape.hidden, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: LayerKV | None
    ) -> tuple[torch.Tensor, LayerKV]:
        attended, kv = self.attn(self.input_norm(x), cos, sin, past)
        x = x + attended
        h = self.post_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)), kv


class TinyLlama(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab_size, shape.hidden)
        self.layers = nn.ModuleList(_Block(shape) for _ in range(shape.num_layers))
        self.norm = _RMSNorm(shape.hidden, shape.norm_eps)
        inv_freq = 1.0 / shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float64) / shape.head_dim)
        angles = torch.outer(torch.arange(shape.max_model_len, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        # Buffers, not parameters: they follow the module's device but are derived, never trained or saved.
        self._cos: torch.Tensor
        self._sin: torch.Tensor
        self.register_buffer("_cos", angles.cos().to(shape.dtype), persistent=False)
        self.register_buffer("_sin", angles.sin().to(shape.dtype), persistent=False)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, past: list[LayerKV] | None = None) -> tuple[torch.Tensor, list[LayerKV]]:
        """Logits of the last position, and every layer's KV for past + tokens."""
        start = past[0].num_tokens if past else 0
        end = start + tokens.shape[0]
        if end > self.shape.max_model_len:
            raise ValueError(f"{end} positions exceed the model's {self.shape.max_model_len}")
        cos, sin = self._cos[start:end], self._sin[start:end]
        x = self.embed(tokens)
        kvs: list[LayerKV] = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, past[i] if past else None)
            kvs.append(kv)
        last = self.norm(x[-1:])
        return F.linear(last, self.embed.weight)[0], kvs


def build_model(shape: ModelShape = ModelShape(), seed: int = 0) -> TinyLlama:
    """The same weights for the same seed, in any process."""
    generator = torch.Generator().manual_seed(seed)
    model = TinyLlama(shape)
    std = 1 / math.sqrt(shape.hidden)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.to(shape.dtype).eval()
