"""The codecs keep what shared.compression promises: int8 within its bound, zlib and zstd bit-exact."""

from __future__ import annotations

import threading

import pytest
import torch

from kvbus.agent import codecs
from kvbus.agent.refused import Refused
from kvbus.agent.synthetic import synthetic_kv
from kvbus.engine.kv_chunks import cut
from kvbus.engine.model import build_model
from kvbus.shared import compression
from kvbus.shared.hashing import HashSpace
from tests.agent.int8_bound import FLOAT32_ARITHMETIC, int8_bound

LOSSLESS = [name for name, method in compression.METHODS.items() if method.lossless]
DEVICES = [
    pytest.param(torch.device("cpu"), id="cpu"),
    pytest.param(
        torch.device("cuda"), id="gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


def random_kv(
    dtype: torch.dtype = torch.float32,
    layers: int = 4,
    tokens: int = 256,
    width: int = 128,
    device: torch.device | None = None,
) -> torch.Tensor:
    """A KV_2LTD chunk whose K/V planes and channels differ in scale, as real KV's do."""
    generator = torch.Generator().manual_seed(7)
    kv = torch.randn(2, layers, tokens, width, generator=generator)
    kv *= torch.rand(2, layers, 1, width, generator=generator) * 10 + 0.01
    return kv.to(dtype=dtype, device=device)


def model_kv(tokens: int = 512) -> list[torch.Tensor]:
    """Chunks of the reference model's real KV for a random prompt, 256 tokens each."""
    prompt = torch.randint(0, 128000, (tokens,), generator=torch.Generator().manual_seed(3))
    _, kvs = build_model()(prompt)
    return cut(kvs, HashSpace("test/model", 256).chunks(prompt.tolist()))


def channel_bound(x: torch.Tensor) -> torch.Tensor:
    """int8's bound per channel as Int8 lays channels out (for tensors of 2 or more dimensions)."""
    return int8_bound(x, codecs.scale_dims(x.dim()))


def test_every_catalogued_method_has_a_codec_and_keeps_its_promise() -> None:
    x = random_kv(layers=2, tokens=16)
    for name, method in compression.METHODS.items():
        assert method.lossless == (method.error_bound is None)
        if not method.in_kvbus:
            continue  # LMCache's own (cachegen): refused below
        packed = codecs.encode(x, name)
        assert packed.method == name
        restored = packed.decode()
        assert (restored.shape, restored.dtype) == (x.shape, x.dtype)
        assert torch.equal(restored, x) == method.lossless


def test_lmcache_s_own_method_is_known_but_refused_saying_who_runs_it() -> None:
    assert not compression.method("cachegen").in_kvbus
    with pytest.raises(Refused, match="cachegen is LMCache's own .* kvbus agents compress with int8, zlib, zstd$"):
        codecs.encode(random_kv(), "cachegen")


def test_an_unknown_method_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(Refused, match="unknown compression method 'lz77'; known methods: int8, zlib, zstd, cachegen$"):
        codecs.encode(random_kv(), "lz77")
    with pytest.raises(Refused, match="int8, zlib, zstd, cachegen$"):
        codecs.known_method("")
    with pytest.raises(ValueError, match="int8, zlib, zstd, cachegen$"):
        compression.method("")


@pytest.mark.parametrize("device", DEVICES)
def test_int8_stays_within_its_stated_bound_and_quarters_float32(device: torch.device) -> None:
    x = random_kv(device=device)
    packed = codecs.encode(x, "int8")
    restored = packed.decode()
    assert restored.device == x.device
    error = (restored - x).abs()
    assert bool((error <= channel_bound(x)).all())
    assert float((error / channel_bound(x)).amax()) > 0.9  # the bound is tight, not a loose guess
    # A float32 scale per K/V, layer and channel: 2*4*128 scales against 2*4*256*128 values.
    assert packed.nbytes == x.numel() + 2 * 4 * 128 * 4
    assert packed.nbytes / (x.numel() * x.element_size()) < 0.26


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_on_half_precision_adds_only_that_dtype_s_rounding(dtype: torch.dtype) -> None:
    x = random_kv(dtype)
    restored = codecs.encode(x, "int8").decode()
    assert restored.dtype == dtype
    bound = channel_bound(x)
    rounding = (x.float().abs() + bound) * torch.finfo(dtype).eps / 2  # to the dtype, of a value that far off
    assert bool(((restored.float() - x.float()).abs() <= (bound + rounding)).all())


def test_int8_on_the_reference_model_s_kv() -> None:
    for chunk in model_kv():
        restored = codecs.encode(chunk, "int8").decode()
        assert bool(((restored - chunk).abs() <= channel_bound(chunk)).all())


def test_int8_takes_any_shape_with_the_last_dimension_as_channels() -> None:
    assert codecs.scale_dims(4) == (2,)  # KV_2LTD: over tokens, per K/V, layer and channel
    generator = torch.Generator().manual_seed(11)
    blocks = torch.randn(3, 2, 16, 2, 8, generator=generator)  # opaque paged blocks: [layers, blocks, *block_shape]
    packed = codecs.encode(blocks, "int8")
    assert isinstance(packed, codecs.Int8) and packed.scale.shape == (3, 2, 1, 1, 8)
    assert bool(((packed.decode() - blocks).abs() <= channel_bound(blocks)).all())
    rows = torch.randn(5, 16, 8, generator=generator)
    assert bool(((codecs.encode(rows, "int8").decode() - rows).abs() <= channel_bound(rows)).all())
    flat = torch.tensor([3.0, -1.0, 0.5])  # 1-D: one channel
    assert bool(((codecs.encode(flat, "int8").decode() - flat).abs() <= 3.0 / 254 * FLOAT32_ARITHMETIC).all())
    zeros = torch.zeros(4, 8)
    assert torch.equal(codecs.encode(zeros, "int8").decode(), zeros)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(8),
        torch.ones(4, dtype=torch.uint8),
        torch.tensor([1.0, float("inf")]),
        torch.tensor([[float("nan")], [1.0]]),
    ],
    ids=["int64", "uint8", "inf", "nan"],
)
def test_int8_refuses_what_it_cannot_represent(tensor: torch.Tensor) -> None:
    with pytest.raises(codecs.Unsuitable):
        codecs.encode(tensor, "int8")


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equality is bit-exact (nan equals itself, -0.0 differs from 0.0)."""
    return x.contiguous().reshape(-1).view(torch.uint8)


def test_the_lossless_methods_are_zlib_and_zstd() -> None:
    assert LOSSLESS == ["zlib", "zstd"]


@pytest.mark.parametrize("method", LOSSLESS)
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.float64,
        torch.complex64,
        torch.int64,
        torch.int8,
        torch.uint8,
        torch.bool,
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_lossless_methods_are_bit_exact_for_any_dtype(method: str, dtype: torch.dtype, device: torch.device) -> None:
    x = (random_kv(layers=2, tokens=32) * 100).to(dtype=dtype, device=device)
    restored = codecs.encode(x, method).decode()
    assert (restored.shape, restored.dtype, restored.device) == (x.shape, x.dtype, x.device)
    assert torch.equal(as_bytes(restored), as_bytes(x))


@pytest.mark.parametrize("method", LOSSLESS)
@pytest.mark.parametrize(
    "x",
    [
        torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40], dtype=torch.float32),
        torch.tensor(2.5, dtype=torch.bfloat16),
        torch.zeros(0, 3, dtype=torch.float16),
        torch.randn(1, dtype=torch.float16),
        torch.randn(7, 13, dtype=torch.bfloat16),
        torch.randn(3, 5, 11).to(torch.float8_e4m3fn),
        random_kv(torch.bfloat16, layers=2, tokens=8).transpose(1, 3),
        random_kv(torch.float16, layers=2, tokens=9)[:, :, 1::2],
        random_kv(torch.float32, layers=3, tokens=5)[1:, ..., 3:-2],
        torch.randn(6, 4, dtype=torch.float16).t(),
        torch.randn(4, 1, dtype=torch.float16).expand(4, 6),
    ],
    ids=[
        "non-finite",
        "scalar",
        "empty",
        "one-value",
        "odd-size",
        "fp8-odd-size",
        "transposed",
        "strided",
        "offset-view",
        "t",
        "expanded",
    ],
)
def test_lossless_methods_keep_odd_sizes_special_values_and_non_contiguous_views(method: str, x: torch.Tensor) -> None:
    restored = codecs.encode(x, method).decode()
    assert (restored.shape, restored.dtype) == (x.shape, x.dtype)
    assert torch.equal(as_bytes(restored), as_bytes(x))


def test_byte_planes_put_each_byte_position_in_a_row_and_back() -> None:
    x = torch.tensor([0x0102, 0x0304, 0x0506], dtype=torch.int16).view(torch.float16)
    planes = codecs.byte_planes(x)
    assert planes.tolist() == [[0x02, 0x04, 0x06], [0x01, 0x03, 0x05]]  # little-endian: low bytes first
    assert torch.equal(as_bytes(codecs.from_byte_planes(planes, x.shape, x.dtype)), as_bytes(x))


def test_zstd_keeps_a_plane_it_cannot_shrink_raw_and_compresses_the_rest() -> None:
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = codecs.encode(noise, "zstd")
    assert isinstance(packed, codecs.Zstd) and packed.sizes == (4096,) and packed.nbytes == 4096
    assert torch.equal(packed.payload, noise)
    # float16 KV: the low bytes are mantissa, nearly random, and stay raw; the high bytes
    # (sign, exponent, two bits of mantissa) repeat enough to shrink.
    kv = random_kv(torch.float16)
    halves = codecs.encode(kv, "zstd")
    assert isinstance(halves, codecs.Zstd)
    assert halves.sizes[0] == kv.numel() and halves.sizes[1] < 0.8 * kv.numel()
    assert halves.nbytes == sum(halves.sizes)


@pytest.mark.parametrize("device", DEVICES)
def test_zstd_keeps_its_payload_on_the_tensor_s_device(device: torch.device) -> None:
    x = random_kv(torch.bfloat16, device=device)
    packed = codecs.encode(x, "zstd")
    assert isinstance(packed, codecs.Zstd) and packed.payload.device.type == device.type
    assert torch.equal(packed.decode(), x)


def test_zstd_is_smaller_than_zlib_on_the_reference_model_s_kv_and_the_benchmark_s() -> None:
    space = HashSpace("test/synthetic", 256)
    chunks = [x.to(dtype) for x in model_kv() for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    chunks += synthetic_kv(space, list(range(512)))  # what the standalone agent holds: randn float16
    for x in chunks:
        zstd, zlib = codecs.encode(x, "zstd"), codecs.encode(x, "zlib")
        assert zstd.nbytes < zlib.nbytes < x.numel() * x.element_size(), x.dtype


def test_zstd_encodes_and_decodes_from_many_threads_at_once() -> None:
    tensors = [random_kv(dtype, layers=2, tokens=64) for dtype in (torch.float16, torch.bfloat16, torch.float32)]
    failures: list[str] = []

    def work() -> None:
        for _ in range(20):
            for x in tensors:
                if not torch.equal(codecs.encode(x, "zstd").decode(), x):
                    failures.append(str(x.dtype))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_zlib_shrinks_the_reference_model_s_kv() -> None:
    for chunk in model_kv():
        for dtype, most in ((torch.float32, 0.9), (torch.bfloat16, 0.8)):
            x = chunk.to(dtype)
            assert codecs.encode(x, "zlib").nbytes < most * x.numel() * x.element_size()
