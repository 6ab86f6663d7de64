"""The error int8 promises (shared.compression's error_bound), as a tensor to compare a round trip with."""

from __future__ import annotations

import torch

# The promise adds rounding to the stored dtype, which float32 arithmetic does at each step: dividing by
# the scale, multiplying back, and the scale itself each round by eps/2 of a value up to 127 scales
# (254 bounds), so together by under 3 * 127 * eps bounds; 512 eps covers them. A random trial
# measured 8e-6 over the bare bound, more than a 1e-6 slack, which is why a tighter one was flaky.
FLOAT32_ARITHMETIC = 1 + 512 * torch.finfo(torch.float32).eps


def int8_bound(x: torch.Tensor, dims: int | tuple[int, ...]) -> torch.Tensor:
    """max|x_c| / 254 over `dims` (one channel's values), with float32's arithmetic, broadcast over `x`."""
    return x.float().abs().amax(dim=dims, keepdim=True) / 254 * FLOAT32_ARITHMETIC
