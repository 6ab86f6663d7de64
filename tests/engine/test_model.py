"""The tiny model and the KV chunk layout: reused KV must give the logits of a full recompute."""

from __future__ import annotations

import pytest
import torch

from kvbus.engine import kv_chunks
from kvbus.engine.model import ModelShape, TinyLlama, build_model
from kvbus.shared.hashing import HashSpace

SMALL = ModelShape(vocab_size=1000, hidden=64, intermediate=128, num_layers=2, max_model_len=1024)
SPACE = HashSpace("tiny", chunk_size=256, save_unfull_chunk=True)


@pytest.fixture(scope="module")
def model() -> TinyLlama:
    return build_model(SMALL, seed=0)


def prompt(length: int, seed: int = 1) -> list[int]:
    return torch.randint(0, SMALL.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = build_model(SMALL, seed=0), build_model(SMALL, seed=0), build_model(SMALL, seed=1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_chunks_are_kv_2ltd_and_glue_back_exactly(model: TinyLlama) -> None:
    tokens = prompt(600)
    _, kvs = model(torch.tensor(tokens))
    chunks = SPACE.chunks(tokens)
    tensors = kv_chunks.cut(kvs, chunks)
    assert [tuple(t.shape) for t in tensors] == [(2, 2, n, 2 * 16) for n in (256, 256, 88)]
    assert all(t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * 4 for t in tensors)
    glued = kv_chunks.glue(tensors, 600, SMALL)
    for original, back in zip(kvs, glued, strict=True):
        assert torch.equal(original.keys, back.keys)
        assert torch.equal(original.values, back.values)
    partial = kv_chunks.glue(tensors, 300, SMALL)
    assert torch.equal(partial[1].values, kvs[1].values[:, :300])


def test_glue_refuses_more_tokens_than_the_chunks_hold(model: TinyLlama) -> None:
    tokens = prompt(300)
    _, kvs = model(torch.tensor(tokens))
    with pytest.raises(ValueError, match="cover 300 tokens, 301 asked"):
        kv_chunks.glue(kv_chunks.cut(kvs, SPACE.chunks(tokens)), 301, SMALL)


@pytest.mark.parametrize("reused", [256, 512, 599, 1])
def test_logits_on_reused_kv_match_a_full_recompute(model: TinyLlama, reused: int) -> None:
    tokens = prompt(600)
    full_logits, full_kvs = model(torch.tensor(tokens))
    stored = kv_chunks.cut(full_kvs, SPACE.chunks(tokens))
    past = kv_chunks.glue(stored, reused, SMALL)
    logits, kvs = model(torch.tensor(tokens[reused:]), past)
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kvs[-1].values, full_kvs[-1].values, atol=1e-4, rtol=1e-4)
    assert torch.argmax(logits) == torch.argmax(full_logits)


def test_decoding_one_token_at_a_time_matches_a_longer_prefill(model: TinyLlama) -> None:
    tokens = prompt(40)
    logits, kvs = model(torch.tensor(tokens[:39]))
    stepped, _ = model(torch.tensor(tokens[39:]), kvs)
    whole, _ = model(torch.tensor(tokens))
    torch.testing.assert_close(stepped, whole, atol=1e-4, rtol=1e-4)


def test_a_prompt_past_the_context_is_refused(model: TinyLlama) -> None:
    with pytest.raises(ValueError, match="exceed the model's 1024"):
        model(torch.zeros(1025, dtype=torch.long))


def test_default_shape_is_llama3_shaped() -> None:
    shape = ModelShape()
    assert (shape.vocab_size, shape.num_kv_heads, shape.head_dim, shape.max_model_len) == (128256, 2, 64, 4096)
    assert shape.kv_bytes_per_token == 2 * 4 * 2 * 64 * 4
