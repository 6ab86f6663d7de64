"""Write a tiny random-weight Llama-3-shaped model and a Llama-3 tokenizer into a directory vLLM loads offline.

    .venv-vllm/bin/python tests/vllm/tiny_model.py DIR

Runs with the vLLM venv's python (it needs transformers). The weights are seeded, so every build
is the same model. The tokenizer is derived at build time from quicktok's bundled Llama-3 ranks:
the vocabulary is under Meta's licence, so nothing of it is kept in this repository.
"""

from __future__ import annotations

import sys
from pathlib import Path

import quicktok
import torch
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


class _QuicktokConverter(TikTokenConverter):
    """TikTokenConverter, with the BPE ranks read from quicktok instead of a tiktoken file."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        encoding = quicktok.get_encoding("llama3")  # token_byte_values() is not in rank order
        return {
            encoding.decode_single_token_bytes(rank): rank
            for rank in range(encoding.max_token_value + 1)
            if not encoding.is_special_token(rank)
        }


def build_tokenizer(out: Path) -> None:
    encoding = quicktok.get_encoding("llama3")
    specials = sorted(encoding.special_tokens_set, key=encoding.encode_single_token)
    tokenizer = _QuicktokConverter(vocab_file="quicktok:llama3", extra_special_tokens=specials).converted()
    bos_id = encoding.encode_single_token(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, model_max_length=4096
    ).save_pretrained(out)


def build_model(out: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
        torch_dtype="bfloat16",
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    build_model(out)


if __name__ == "__main__":
    main()
