"""kvbus reproduces LMCache 0.5.6's chunk hashes, checked against vectors recorded from LMCache's own code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbus.shared.hashing import HashSpace, LMCacheHashSpace, space_from_name, vllm_none_hash

VECTORS = json.loads((Path(__file__).parents[1] / "lmcache" / "hash_vectors.json").read_text())


def _cases() -> list[tuple[str, str, bool]]:
    return [
        (setting, name, name.endswith("True"))
        for setting, vectors in VECTORS["vectors"].items()
        for name in vectors
        if name.startswith("worker/")
    ]


@pytest.mark.parametrize(("setting", "name", "unfull"), _cases())
def test_chunk_hashes_equal_lmcaches(setting: str, name: str, unfull: bool) -> None:
    recorded = VECTORS["vectors"][setting]
    none_hash = recorded.get("NONE_HASH", 0)  # only engines with vLLM have one
    tokens = VECTORS["prompts"][name.split("/")[1]]
    space = LMCacheHashSpace(VECTORS["chunk_size"], none_hash, save_unfull_chunk=unfull)
    assert [int(chunk.key) for chunk in space.chunks(tokens)] == recorded[name]


@pytest.mark.parametrize("seed", [0, 123])
def test_vllms_none_hash_is_the_hash_of_the_seed_as_text(seed: int) -> None:
    assert vllm_none_hash(seed) == VECTORS["vectors"][f"vLLM importable, PYTHONHASHSEED={seed}"]["NONE_HASH"]


def test_space_names_round_trip_and_tell_the_kinds_apart() -> None:
    lmcache = LMCacheHashSpace(256, -42)
    assert space_from_name(lmcache.name) == lmcache
    assert space_from_name("256:meta-llama/Llama-3.1-8B-Instruct") == HashSpace("meta-llama/Llama-3.1-8B-Instruct", 256)
    for bad in ("lmcache:0:0", "lmcache:256:x", "lmcache:256"):
        with pytest.raises(ValueError, match="not an LMCache hash space"):
            space_from_name(bad)
