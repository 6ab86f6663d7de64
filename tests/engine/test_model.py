"""The tiny model: seeded weights, reused KV giving the logits of a full recompute, and its context limit."""

from __future__ import annotations

import pytest
import torch

from kvbus.engine import kv_chunks
from kvbus.engine.model import ModelShape, TinyLlama, build_model
from kvbus.shared.hashing import HashSpace
from tests.engine.conftest import SMALL, small_prompt

SPACE = HashSpace("tiny", chunk_size=256, save_unfull_chunk=True)


def test_same_seed_same_weights_other_seed_other_weights(small_model: TinyLlama) -> None:
    b, c = build_model(SMALL, seed=0), build_model(SMALL, seed=1)
    for (name, pa), pb, pc in zip(small_model.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


@pytest.mark.parametrize("reused", [256, 512, 599, 1])
def test_logits_on_reused_kv_match_a_full_recompute(small_model: TinyLlama, reused: int) -> None:
    tokens = small_prompt(600)
    full_logits, full_kvs = small_model(torch.tensor(tokens))
    stored = kv_chunks.cut(full_kvs, SPACE.chunks(tokens))
    past = kv_chunks.glue(stored, reused, SMALL)
    logits, kvs = small_model(torch.tensor(tokens[reused:]), past)
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kvs[-1].values, full_kvs[-1].values, atol=1e-4, rtol=1e-4)
    assert torch.argmax(logits) == torch.argmax(full_logits)


def test_decoding_one_token_at_a_time_matches_a_longer_prefill(small_model: TinyLlama) -> None:
    tokens = small_prompt(40)
    logits, kvs = small_model(torch.tensor(tokens[:39]))
    stepped, _ = small_model(torch.tensor(tokens[39:]), kvs)
    whole, _ = small_model(torch.tensor(tokens))
    torch.testing.assert_close(stepped, whole, atol=1e-4, rtol=1e-4)


def test_kv_has_one_entry_per_layer_and_position_in_kv_heads(small_model: TinyLlama) -> None:
    logits, kvs = small_model(torch.tensor(small_prompt(10)))
    assert logits.shape == (SMALL.vocab_size,)
    assert len(kvs) == SMALL.num_layers
    assert all(kv.keys.shape == kv.values.shape == (SMALL.num_kv_heads, 10, SMALL.head_dim) for kv in kvs)
    _, longer = small_model(torch.tensor(small_prompt(3, seed=2)), kvs)
    assert [kv.num_tokens for kv in longer] == [13] * SMALL.num_layers


def test_a_prompt_past_the_context_is_refused(small_model: TinyLlama) -> None:
    with pytest.raises(ValueError, match="exceed the model's 1024"):
        small_model(torch.zeros(1025, dtype=torch.long))
    _, kvs = small_model(torch.zeros(1000, dtype=torch.long))
    with pytest.raises(ValueError, match="1025 positions exceed"):
        small_model(torch.zeros(25, dtype=torch.long), kvs)


def test_default_shape_is_llama3_shaped() -> None:
    shape = ModelShape()
    assert (shape.vocab_size, shape.num_kv_heads, shape.head_dim, shape.max_model_len) == (128256, 2, 64, 4096)
    assert shape.kv_bytes_per_token == 2 * 4 * 2 * 64 * 4
