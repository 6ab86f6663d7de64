"""The codecs keep what shared.compression promises: int8 within its bound, zlib bit-exact."""

from __future__ import annotations

import pytest
import torch

from kvbus.agent import codecs
from kvbus.agent.refused import Refused
from kvbus.engine.kv_chunks import cut
from kvbus.engine.model import build_model
from kvbus.shared import compression
from kvbus.shared.hashing import HashSpace

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


def int8_bound(x: torch.Tensor) -> torch.Tensor:
    """max|x_c| / 254 per channel, broadcast over the tensor (for tensors of 2 or more dimensions)."""
    return x.float().abs().amax(dim=codecs.scale_dims(x.dim()), keepdim=True) / 254


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
    with pytest.raises(Refused, match="cachegen is LMCache's own .* kvbus agents compress with int8, zlib$"):
        codecs.encode(random_kv(), "cachegen")


def test_an_unknown_method_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(Refused, match="unknown compression method 'lz77'; known methods: int8, zlib"):
        codecs.encode(random_kv(), "lz77")
    with pytest.raises(Refused, match="int8, zlib"):
        codecs.known_method("")
    with pytest.raises(ValueError, match="int8, zlib"):
        compression.method("")


@pytest.mark.parametrize("device", DEVICES)
def test_int8_stays_within_its_stated_bound_and_quarters_float32(device: torch.device) -> None:
    x = random_kv(device=device)
    packed = codecs.encode(x, "int8")
    restored = packed.decode()
    assert restored.device == x.device
    error = (restored - x).abs()
    assert bool((error <= int8_bound(x) * (1 + 1e-6)).all())
    assert float((error / int8_bound(x)).amax()) > 0.9  # the bound is tight, not a loose guess
    # A float32 scale per K/V, layer and channel: 2*4*128 scales against 2*4*256*128 values.
    assert packed.nbytes == x.numel() + 2 * 4 * 128 * 4
    assert packed.nbytes / (x.numel() * x.element_size()) < 0.26


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_on_half_precision_adds_only_that_dtype_s_rounding(dtype: torch.dtype) -> None:
    x = random_kv(dtype)
    restored = codecs.encode(x, "int8").decode()
    assert restored.dtype == dtype
    bound = int8_bound(x)
    rounding = (x.float().abs() + bound) * torch.finfo(dtype).eps / 2  # to the dtype, of a value that far off
    assert bool(((restored.float() - x.float()).abs() <= (bound + rounding) * (1 + 1e-6)).all())


def test_int8_on_the_reference_model_s_kv() -> None:
    for chunk in model_kv():
        restored = codecs.encode(chunk, "int8").decode()
        assert bool(((restored - chunk).abs() <= int8_bound(chunk) * (1 + 1e-6)).all())


def test_int8_takes_any_shape_with_the_last_dimension_as_channels() -> None:
    assert codecs.scale_dims(4) == (2,)  # KV_2LTD: over tokens, per K/V, layer and channel
    blocks = torch.randn(3, 2, 16, 2, 8)  # opaque paged blocks: [layers, blocks, *block_shape]
    packed = codecs.encode(blocks, "int8")
    assert isinstance(packed, codecs.Int8) and packed.scale.shape == (3, 2, 1, 1, 8)
    assert bool(((packed.decode() - blocks).abs() <= int8_bound(blocks) * (1 + 1e-6)).all())
    rows = torch.randn(5, 16, 8)
    assert bool(((codecs.encode(rows, "int8").decode() - rows).abs() <= int8_bound(rows) * (1 + 1e-6)).all())
    flat = torch.tensor([3.0, -1.0, 0.5])  # 1-D: one channel
    assert bool(((codecs.encode(flat, "int8").decode() - flat).abs() <= 3.0 / 254 * (1 + 1e-6)).all())
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("device", DEVICES)
def test_zlib_is_bit_exact_for_any_dtype(dtype: torch.dtype, device: torch.device) -> None:
    x = (random_kv(layers=2, tokens=32) * 100).to(dtype=dtype, device=device)
    restored = codecs.encode(x, "zlib").decode()
    assert (restored.shape, restored.dtype, restored.device) == (x.shape, x.dtype, x.device)
    assert torch.equal(
        restored.view(torch.uint8) if dtype.is_floating_point else restored,
        x.view(torch.uint8) if dtype.is_floating_point else x,
    )


def test_zlib_keeps_non_finite_values_scalars_and_strided_views() -> None:
    special = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40], dtype=torch.float32)
    assert torch.equal(codecs.encode(special, "zlib").decode().view(torch.int32), special.view(torch.int32))
    scalar = torch.tensor(2.5, dtype=torch.bfloat16)
    assert torch.equal(codecs.encode(scalar, "zlib").decode(), scalar)
    strided = random_kv(torch.bfloat16, layers=2, tokens=8).transpose(1, 3)
    assert torch.equal(codecs.encode(strided, "zlib").decode(), strided)


def test_zlib_shrinks_the_reference_model_s_kv() -> None:
    for chunk in model_kv():
        for dtype, most in ((torch.float32, 0.9), (torch.bfloat16, 0.8)):
            x = chunk.to(dtype)
            assert codecs.encode(x, "zlib").nbytes < most * x.numel() * x.element_size()
