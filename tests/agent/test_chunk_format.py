"""The chunk format: its bytes as documented, every dtype and shape back bit for bit, and damage caught."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

from kvbus.agent import chunk_format
from kvbus.agent.chunk_format import ChunkFormatError

KEY = "k" * 32
SPACE = "test/model@4"


def write(path: Path, tensor: torch.Tensor, *, layout: str = "", num_tokens: int = 4, is_head: bool = True) -> None:
    with open(path, "wb") as out:
        chunk_format.write_file(
            out, tensor, key=KEY, space=SPACE, layout=layout, num_tokens=num_tokens, is_head=is_head
        )


def read(path: Path) -> tuple[chunk_format.FileHeader, torch.Tensor]:
    with open(path, "rb") as handle:
        start = chunk_format.read_start(handle)
        return start.header, chunk_format.read_payload(handle, start)


def documented_file(
    tensor: torch.Tensor, *, key: str, space: str, layout: str, num_tokens: int, is_head: bool
) -> bytes:
    """A chunk file laid out by hand as the module's docstring says, as every version has written them."""
    fields = {"key": key, "space": space, "layout": layout, "num_tokens": num_tokens, "is_head": is_head}
    dtype = str(tensor.dtype).removeprefix("torch.")
    header = json.dumps({**fields, "dtype": dtype, "shape": list(tensor.shape)}, separators=(",", ":")).encode()
    length = struct.pack("<I", len(header))
    payload = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    start = b"KVBUSCK1" + hashlib.sha256(length + header + payload).digest() + length + header
    return start + bytes(-len(start) % 64) + payload


def test_a_file_is_magic_digest_length_header_padding_payload(tmp_path: Path) -> None:
    """Files written by earlier versions must still be read: the layout is fixed."""
    tensor = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    write(tmp_path / "c", tensor, layout="L1")
    expected = documented_file(tensor, key=KEY, space=SPACE, layout="L1", num_tokens=4, is_head=True)
    assert (tmp_path / "c").read_bytes() == expected


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(2, 3, 4, 8).to(torch.bfloat16),
        torch.randn(2, 3, 4, 8),
        torch.randn(8, 4).t(),  # not contiguous
        torch.arange(16, dtype=torch.int32).reshape(2, 8),
        torch.empty(0, 8, dtype=torch.float16),
    ],
    ids=["bfloat16", "float32", "transposed", "int32", "empty"],
)
def test_every_dtype_and_shape_comes_back_bit_for_bit(tmp_path: Path, tensor: torch.Tensor) -> None:
    write(tmp_path / "c", tensor, num_tokens=3, is_head=False)
    header, back = read(tmp_path / "c")
    assert header == chunk_format.FileHeader(
        KEY, SPACE, "", 3, False, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)
    )
    assert back.dtype == tensor.dtype and back.shape == tensor.shape and torch.equal(back, tensor)
    # The peer transfer's path: the same bytes, from memory rather than a file.
    payload = bytearray(chunk_format.payload_of(tensor))
    assert torch.equal(chunk_format.tensor_from(payload, chunk_format.dtype_name(tensor.dtype), tensor.shape), tensor)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip", "checksum mismatch"),
        ("truncate", "file size does not match its header"),
        ("grow", "file size does not match its header"),
        ("shape", "file size does not match its header"),
        ("dtype", "unknown dtype 'Tensor'"),
        ("magic", "not a kvbus chunk file"),
        ("length", "header length 4294967295 is implausible"),
        ("cut_header", "truncated header"),
        ("json", "unreadable header"),
        ("tokens", "header holds impossible sizes"),
    ],
)
def test_damage_is_caught_and_named(tmp_path: Path, damage: str, reason: str) -> None:
    path = tmp_path / "c"
    write(path, torch.ones(4, 8, dtype=torch.float16))
    data = path.read_bytes()
    damaged = {
        "flip": data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:],
        "truncate": data[:-1],
        "grow": data + b"\0",
        "shape": data.replace(b'"shape":[4,8]', b'"shape":[9,8]'),
        "dtype": data.replace(b'"float16"', b'"Tensor" '),
        "magic": b"KVBUSCK0" + data[8:],
        "length": data[:40] + b"\xff\xff\xff\xff" + data[44:],
        "cut_header": data[:60],
        "json": data.replace(b'"num_tokens"', b'"num_tokenz"'),
        "tokens": data.replace(b'"num_tokens":4', b'"num_tokens":0'),
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(ChunkFormatError, match=reason):
        read(path)


def test_a_payload_that_does_not_fit_its_dtype_and_shape_is_refused() -> None:
    with pytest.raises(ChunkFormatError, match="7 bytes cannot hold a float16 tensor of shape"):
        chunk_format.tensor_from(bytearray(7), "float16", [2, 2])
    with pytest.raises(ChunkFormatError, match="unknown dtype 'Size'"):
        chunk_format.tensor_from(bytearray(8), "Size", [2, 2])


def test_the_checksum_is_sha256_of_its_parts_in_order() -> None:
    assert chunk_format.checksum(b"ab", bytearray(b"c"), memoryview(b"d")) == hashlib.sha256(b"abcd").digest()
