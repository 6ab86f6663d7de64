"""Prompt text to token ids, offline, as the model's own tokenizer gives them (Llama-3 prepends BOS)."""

from __future__ import annotations

import quicktok

LLAMA3_BOS = 128000


def encode_prompt(text: str, model: str) -> list[int]:
    try:
        encoding = quicktok.encoding_for_model(model)
    except KeyError as exc:
        raise ValueError(f"no offline tokenizer for model {model!r}; pass token ids instead") from exc
    ids = list(encoding.encode(text))
    return [LLAMA3_BOS, *ids] if encoding.name == "llama3" else ids
