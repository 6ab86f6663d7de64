from __future__ import annotations

import pytest

from kvbus.agent.tokenizer import encode_prompt
from tests.conftest import MODEL, SEED_TEXT, SEED_TOKENS


def test_the_seed_prompt_gives_the_seed_token_ids() -> None:
    assert encode_prompt(SEED_TEXT, MODEL) == SEED_TOKENS


def test_a_model_without_an_offline_tokenizer_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="no offline tokenizer for model 'acme/unknown-7b'"):
        encode_prompt("hello", "acme/unknown-7b")
