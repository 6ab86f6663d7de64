"""Models the engine tests share, each built once: weights come from a fixed seed and inference never changes them."""

from __future__ import annotations

import pytest
import torch

from kvbus.engine.model import ModelShape, TinyLlama, build_model

# The served model's shape with a short context, so context-length errors need only ~1k tokens.
SHAPE = ModelShape(max_model_len=1024)
# A model small enough that tests of the layout and the maths run in milliseconds.
SMALL = ModelShape(vocab_size=1000, hidden=64, intermediate=128, num_layers=2, max_model_len=1024)
LONG = list(range(2000, 2600))  # 600 tokens: two full chunks and an 88-token tail


@pytest.fixture(scope="session")
def model() -> TinyLlama:
    """The engine's own weights (seed 0), so the generator's tests see the text the server would send."""
    return build_model(SHAPE, seed=0)


@pytest.fixture(scope="session")
def small_model() -> TinyLlama:
    return build_model(SMALL, seed=0)


def small_prompt(length: int, seed: int = 1) -> list[int]:
    """Random token ids inside SMALL's vocabulary, the same on every run."""
    return torch.randint(0, SMALL.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
