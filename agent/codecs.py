"""The codecs behind kvbus.shared.compression's methods: a tensor to a smaller held form and back.

A packed form keeps its tensors on the device the original was on, so a backend's capacity, which
counts that device's memory, shrinks by what compression saves. Packed forms are immutable, so a
backend may decode one outside its lock while the chunk is evicted or cleared.
"""

from __future__ import annotations

import sys
import threading
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch
import zstandard

from kvbus.agent.refused import Refused
from kvbus.shared import compression

_ZLIB_LEVEL = 1  # level 6 gains ~2% of size on KV and costs 2-5x the time
# Level 1 entropy-codes the exponent planes (negative levels leave them as they are). Byte planes of
# KV hardly repeat, so the matches level 1 hunts for are short and chance ones that cost more to
# code than they save: the smallest match finder (a 64-entry table, 7-byte matches) shrinks the
# reference model's bfloat16 KV to 0.668 of its size where level 1 gives 0.694, at 3.2x the speed
# (float32: 0.834 against 0.847 at 2.3x; randn float16: the same size and speed).
_ZSTD_PARAMETERS = zstandard.ZstdCompressionParameters.from_level(1, hash_log=6, min_match=7)


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


_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def byte_planes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as [width, values] uint8 in host memory: row i holds byte i of every value.

    Grouping by byte position puts the sign and exponent bytes, which repeat, next to each other,
    away from the mantissa bytes, which hardly do. numpy splits them single-threaded at memory speed,
    a value of 2, 4 or 8 bytes read as one word and shifted (1.7-3x faster than copying byte
    columns): torch's transposed copy runs 7x slower, and torch's column copies spread over its
    intra-op threads, which on a busy host spin for 5x the CPU the copy needs.
    """
    width = tensor.element_size()
    raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    planes = np.empty((width, raw.size // width), dtype=np.uint8)
    word = _WORDS.get(width)
    if word is None:
        columns = raw.reshape(-1, width)
        for position in range(width):
            planes[position] = columns[:, position]
        return torch.from_numpy(planes)
    words = raw.view(word)
    for position in range(width):
        shift = 8 * (position if sys.byteorder == "little" else width - 1 - position)
        np.right_shift(words, shift, out=planes[position], casting="unsafe")  # the cast keeps the low byte
    return torch.from_numpy(planes)


def from_byte_planes(planes: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The tensor whose byte_planes are `planes` (in host memory), in host memory."""
    rows = planes.numpy()
    values = np.empty((rows.shape[1], rows.shape[0]), dtype=np.uint8)
    for position in range(rows.shape[0]):
        values[:, position] = rows[position]
    return torch.from_numpy(values.reshape(-1)).view(dtype).reshape(shape)


class Zlib(Packed):
    """zlib over the tensor's byte planes (see byte_planes), one stream for all of them.

    On the reference model's KV, grouping takes bfloat16 from 0.80 to 0.72 of its size.
    """

    __slots__ = ("payload", "device")
    method = "zlib"

    def __init__(self, payload: torch.Tensor, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(shape, dtype)
        self.payload = payload
        self.device = device

    @classmethod
    def encode(cls, tensor: torch.Tensor) -> Zlib:
        planes = byte_planes(tensor)
        packed = zlib.compress(planes.numpy().data, _ZLIB_LEVEL)
        payload = torch.frombuffer(bytearray(packed), dtype=torch.uint8).to(tensor.device)
        return cls(payload, tensor.shape, tensor.dtype, tensor.device)

    @property
    def nbytes(self) -> int:
        return self.payload.numel()

    def decode(self) -> torch.Tensor:
        planes = torch.empty(self.dtype.itemsize, self.shape.numel(), dtype=torch.uint8)
        planes.numpy().reshape(-1).data[:] = zlib.decompress(self.payload.cpu().numpy().data)
        return from_byte_planes(planes, self.shape, self.dtype).to(self.device)


class _ZstdContexts(threading.local):
    """One compressor and one decompressor per thread: zstandard's contexts are not thread-safe,
    and backends decode outside their locks."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(compression_params=_ZSTD_PARAMETERS)
        self.decompressor = zstandard.ZstdDecompressor()


_ZSTD = _ZstdContexts()


class Zstd(Packed):
    """zstd over each of the tensor's byte planes (see byte_planes) apart; a plane it cannot shrink is kept raw.

    A float's mantissa bytes are nearly random: zstd gains nothing on them and skips them quickly,
    and keeping them raw spares decoding them. The exponent bytes shrink by entropy coding, which
    zlib level 1 does at a thirteenth to a twentieth of the speed and to a larger size. zstandard
    and numpy's copies release the interpreter lock while they work, so an engine's Python threads
    keep running beside a compressing agent.
    """

    __slots__ = ("payload", "sizes", "device")
    method = "zstd"

    def __init__(
        self,
        payload: torch.Tensor,
        sizes: tuple[int, ...],
        shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(shape, dtype)
        self.payload = payload
        self.sizes = sizes  # each plane's bytes in payload, in order; a plane as long as the values is raw
        self.device = device

    @classmethod
    def encode(cls, tensor: torch.Tensor) -> Zstd:
        planes = byte_planes(tensor)
        length = planes.shape[1]
        compressor = _ZSTD.compressor
        parts: list[bytes | memoryview] = []
        for plane in planes:
            raw = plane.numpy().data
            packed = compressor.compress(raw)
            parts.append(packed if len(packed) < length else raw)
        sizes = tuple(len(part) for part in parts)
        payload = torch.empty(sum(sizes), dtype=torch.uint8)
        target = payload.numpy().data
        offset = 0
        for part in parts:
            target[offset : offset + len(part)] = part
            offset += len(part)
        return cls(payload.to(tensor.device), sizes, tensor.shape, tensor.dtype, tensor.device)

    @property
    def nbytes(self) -> int:
        return self.payload.numel()

    def decode(self) -> torch.Tensor:
        source = self.payload.cpu().numpy().data
        planes = torch.empty(len(self.sizes), self.shape.numel(), dtype=torch.uint8)
        length = planes.shape[1]
        decompressor = _ZSTD.decompressor
        offset = 0
        for row, size in zip(planes.numpy(), self.sizes, strict=True):
            part = source[offset : offset + size]
            row.data[:] = part if size == length else decompressor.decompress(part)
            offset += size
        return from_byte_planes(planes, self.shape, self.dtype).to(self.device)


_ENCODERS: dict[str, Callable[[torch.Tensor], Packed]] = {
    Int8.method: Int8.encode,
    Zlib.method: Zlib.encode,
    Zstd.method: Zstd.encode,
}


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
