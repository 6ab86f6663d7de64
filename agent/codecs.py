"""The codecs behind kvbus.shared.compression's methods: a tensor to a smaller held form and back.

A packed form keeps its tensors on the device the original was on, so a backend's capacity, which
counts that device's memory, shrinks by what compression saves. Packed forms are immutable, so a
backend may decode one outside its lock while the chunk is evicted or cleared.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from kvbus.agent.refused import Refused
from kvbus.shared import compression

_ZLIB_LEVEL = 1  # level 6 gains ~2% of size on KV and costs 2-5x the time


class Unsuitable(ValueError):
    """A codec cannot take this tensor; the chunk stays as it is."""


class Packed(ABC):
    """A tensor in compressed form, restored by `decode()` to the original shape, dtype and device."""

    __slots__ = ("shape", "dtype")
    method: str

    def __init__(self, shape: torch.Size, dtype: torch.dtype) -> None:
        self.shape = shape
        self.dtype = dtype

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @abstractmethod
    def decode(self) -> torch.Tensor: ...


def scale_dims(ndim: int) -> tuple[int, ...]:
    """The dimensions one int8 scale spans in a tensor of `ndim` >= 2 dimensions (see Int8)."""
    return tuple(range(2 if ndim >= 4 else 0, ndim - 1))


class Int8(Packed):
    """Symmetric int8 with a float32 scale per channel, a channel being a column of the last dimension.

    A tensor of 4 or more dimensions gets its scales per index of its first two as well: per K/V
    and layer for a KV_2LTD chunk [2, layers, tokens, D], per layer and block for paged blocks.
    A 1-D tensor is one channel. Rounding to the nearest of 255 levels spaced
    scale = max|x_c| / 127 apart errs by at most scale / 2 = max|x_c| / 254.
    """

    __slots__ = ("values", "scale")
    method = "int8"

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> None:
        super().__init__(shape, dtype)
        self.values = values
        self.scale = scale

    @classmethod
    def encode(cls, tensor: torch.Tensor) -> Int8:
        if not tensor.is_floating_point() or tensor.element_size() < 2:
            raise Unsuitable(f"int8 quantizes floats of 2 bytes or more, not {tensor.dtype}")
        x = tensor.detach().float()
        if x.dim() < 2:
            x = x.reshape(-1, 1)
        amax = x.abs().amax(dim=scale_dims(x.dim()), keepdim=True)
        if not bool(torch.isfinite(amax).all()):
            raise Unsuitable("int8 cannot represent inf or nan")
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero channel stays zero
        values = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
        return cls(values, scale, tensor.shape, tensor.dtype)

    @property
    def nbytes(self) -> int:
        return self.values.numel() + self.scale.numel() * self.scale.element_size()

    def decode(self) -> torch.Tensor:
        return (self.values.float() * self.scale).to(self.dtype).reshape(self.shape)


class Zlib(Packed):
    """zlib over the tensor's bytes, first bytes of every value, then second bytes, and so on.

    Grouping by byte position puts the sign and exponent bytes, which repeat, next to each other;
    on the reference model's KV that takes bfloat16 from 0.80 to 0.72 of its size.
    """

    __slots__ = ("payload", "device")
    method = "zlib"

    def __init__(self, payload: torch.Tensor, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(shape, dtype)
        self.payload = payload
        self.device = device

    @classmethod
    def encode(cls, tensor: torch.Tensor) -> Zlib:
        host = tensor.detach().contiguous().cpu()
        width = host.element_size()
        by_position = host.reshape(-1).view(torch.uint8).view(-1, width).t().contiguous()
        packed = zlib.compress(by_position.numpy().data, _ZLIB_LEVEL)
        payload = torch.frombuffer(bytearray(packed), dtype=torch.uint8).to(tensor.device)
        return cls(payload, tensor.shape, tensor.dtype, tensor.device)

    @property
    def nbytes(self) -> int:
        return self.payload.numel()

    def decode(self) -> torch.Tensor:
        raw = zlib.decompress(self.payload.cpu().numpy().data)
        by_position = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(self.dtype.itemsize, -1)
        return by_position.t().reshape(-1).view(self.dtype).reshape(self.shape).to(self.device)


_ENCODERS: dict[str, Callable[[torch.Tensor], Packed]] = {Int8.method: Int8.encode, Zlib.method: Zlib.encode}


def known_method(name: str) -> compression.Method:
    """The method called `name`; Refused, naming the known ones, if there is none or it is LMCache's alone
    (cachegen): a client asked for it."""
    try:
        found = compression.method(name)
    except ValueError as exc:
        raise Refused(str(exc)) from None
    if not found.in_kvbus:
        raise Refused(
            f"{name} is LMCache's own compression method, which LMCache workers run and kvbus agents do not "
            f"implement; kvbus agents compress with {compression.IN_KVBUS}"
        )
    return found


def encode(tensor: torch.Tensor, method: str) -> Packed:
    """`tensor` compressed with `method`. Refused for an unknown method, Unsuitable for a tensor it can't take."""
    known_method(method)
    return _ENCODERS[method](tensor)
