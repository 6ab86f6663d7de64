"""Cutting the model's KV into LMCache's KV_2LTD chunks and gluing them back, at and between chunk boundaries."""

from __future__ import annotations

import pytest
import torch

from kvbus.engine import kv_chunks
from kvbus.engine.model import LayerKV, TinyLlama
from kvbus.shared.hashing import HashSpace
from tests.engine.conftest import SMALL, small_prompt

SPACE = HashSpace("tiny", chunk_size=256, save_unfull_chunk=True)
WIDTH = SMALL.num_kv_heads * SMALL.head_dim


@pytest.fixture(scope="module")
def kvs(small_model: TinyLlama) -> list[LayerKV]:
    """The KV of a 600-token prompt: two full chunks of 256 and an 88-token tail."""
    _, computed = small_model(torch.tensor(small_prompt(600)))
    return computed


def assert_same_kv(glued: list[LayerKV], original: list[LayerKV], num_tokens: int) -> None:
    assert len(glued) == len(original)
    for back, kv in zip(glued, original, strict=True):
        assert torch.equal(back.keys, kv.keys[:, :num_tokens])
        assert torch.equal(back.values, kv.values[:, :num_tokens])


def test_chunks_are_kv_2ltd_and_glue_back_exactly(kvs: list[LayerKV]) -> None:
    tensors = kv_chunks.cut(kvs, SPACE.chunks(small_prompt(600)))
    assert [tuple(t.shape) for t in tensors] == [(2, 2, n, 2 * 16) for n in (256, 256, 88)]
    assert all(t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * 4 for t in tensors)
    assert_same_kv(kv_chunks.glue(tensors, 600, SMALL), kvs, 600)
    partial = kv_chunks.glue(tensors, 300, SMALL)
    assert torch.equal(partial[1].values, kvs[1].values[:, :300])


def test_a_chunk_holds_keys_then_values_per_layer_and_position(kvs: list[LayerKV]) -> None:
    second = kv_chunks.cut(kvs, SPACE.chunks(small_prompt(600)))[1]
    layer, position = 1, 300  # position 300 is row 44 of the chunk that starts at 256
    assert torch.equal(second[0, layer, 44], kvs[layer].keys[:, position].reshape(WIDTH))
    assert torch.equal(second[1, layer, 44], kvs[layer].values[:, position].reshape(WIDTH))


def test_chunks_are_copies_that_outlive_changes_to_the_cache(kvs: list[LayerKV]) -> None:
    cache = [LayerKV(kv.keys.clone(), kv.values.clone()) for kv in kvs]
    (first,) = kv_chunks.cut(cache, SPACE.chunks(small_prompt(600))[:1])
    cache[0].keys.zero_()
    assert torch.equal(first[0, 0, 5], kvs[0].keys[:, 5].reshape(WIDTH))


@pytest.mark.parametrize(
    ("chunk_size", "length", "sizes"),
    [(256, 512, [256, 256]), (100, 250, [100, 100, 50]), (300, 300, [300]), (256, 17, [17]), (1, 3, [1, 1, 1])],
)
def test_cut_and_glue_round_trip_for_full_and_partial_chunks(
    kvs: list[LayerKV], chunk_size: int, length: int, sizes: list[int]
) -> None:
    prefix = [LayerKV(kv.keys[:, :length], kv.values[:, :length]) for kv in kvs]
    chunks = HashSpace("tiny", chunk_size=chunk_size).chunks(small_prompt(600)[:length])
    tensors = kv_chunks.cut(prefix, chunks)
    assert [t.shape[2] for t in tensors] == sizes
    assert_same_kv(kv_chunks.glue(tensors, length, SMALL), kvs, length)


@pytest.mark.parametrize("num_tokens", [1, 255, 256, 257, 511, 512, 513, 599])
def test_glue_takes_any_prefix_across_chunk_boundaries(kvs: list[LayerKV], num_tokens: int) -> None:
    tensors = kv_chunks.cut(kvs, SPACE.chunks(small_prompt(600)))
    assert_same_kv(kv_chunks.glue(tensors, num_tokens, SMALL), kvs, num_tokens)


def test_cutting_later_chunks_alone_gives_the_same_tensors(kvs: list[LayerKV]) -> None:
    # The generator cuts only the chunks the agent lacks; they must equal the ones a full cut makes.
    chunks = SPACE.chunks(small_prompt(600))
    whole = kv_chunks.cut(kvs, chunks)
    later = kv_chunks.cut(kvs, chunks[1:])
    assert len(later) == 2 and all(torch.equal(a, b) for a, b in zip(later, whole[1:], strict=True))
    assert kv_chunks.cut(kvs, []) == []


def test_glue_refuses_more_tokens_than_the_chunks_hold(small_model: TinyLlama) -> None:
    tokens = small_prompt(300)
    _, short = small_model(torch.tensor(tokens))
    with pytest.raises(ValueError, match="cover 300 tokens, 301 asked"):
        kv_chunks.glue(kv_chunks.cut(short, SPACE.chunks(tokens)), 301, SMALL)
