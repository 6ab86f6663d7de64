"""Chunk hashes as LMCache 0.5.6 computes them where vLLM is not importable, checked against a pure-Python recipe.

Run: .venv-lmcache/bin/python tests/lmcache/hash_vectors.py [--write]
Each PYTHONHASHSEED case runs LMCache's ChunkedTokenDatabase in a child interpreter, since the seed only takes
effect at interpreter start. `--write` saves the vectors to tests/lmcache/hash_vectors.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness

VECTORS = Path(__file__).with_name("hash_vectors.json")
SEED_PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
RANGE_PROMPT = list(range(1000, 1600))
PROMPTS = {"seed_prompt": SEED_PROMPT, "range_1000_1600": RANGE_PROMPT}
HASH_SEEDS: list[str | None] = ["0", "123", None]

# CPython's (3.8+) hash of ints and tuples on 64-bit builds, spelled out so the chain can be reproduced
# anywhere: ints reduce modulo the Mersenne prime 2**61 - 1 keeping their sign; tuples fold their items'
# hashes with the xxHash64 round.
_MASK = (1 << 64) - 1
_MODULUS = (1 << 61) - 1
_PRIME_1 = 11400714785074694791
_PRIME_2 = 14029467366897019727
_PRIME_5 = 2870177450012600261


def int_hash(value: int) -> int:
    reduced = abs(value) % _MODULUS
    signed = -reduced if value < 0 else reduced
    return -2 if signed == -1 else signed


def tuple_hash(item_hashes: Sequence[int]) -> int:
    acc = _PRIME_5
    for lane in item_hashes:
        acc = (acc + (lane & _MASK) * _PRIME_2) & _MASK
        acc = ((acc << 31) | (acc >> 33)) & _MASK
        acc = (acc * _PRIME_1) & _MASK
    acc = (acc + (len(item_hashes) ^ (_PRIME_5 ^ 3527539))) & _MASK
    if acc == _MASK:
        return 1546275796
    return acc - (1 << 64) if acc >= (1 << 63) else acc


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (64 - bits))) & _MASK


def _sipround(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _MASK
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _MASK
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _MASK
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _MASK
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def str_hash(text: str, hash_seed: int) -> int:
    """CPython 3.11's hash() of an ASCII str in a process started with PYTHONHASHSEED=hash_seed: SipHash-1-3 of
    its bytes, keyed by the first 16 of 24 secret bytes that CPython derives from the seed with an LCG (all zero
    for seed 0, which turns randomisation off)."""
    if not text:
        return 0  # CPython's special case for empty buffers
    secret = bytearray(24)
    state = hash_seed
    for index in range(len(secret) if hash_seed else 0):
        state = (state * 214013 + 2531011) & 0xFFFFFFFF
        secret[index] = (state >> 16) & 0xFF
    k0, k1 = int.from_bytes(secret[0:8], "little"), int.from_bytes(secret[8:16], "little")
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573
    data = text.encode("ascii")
    whole = len(data) - len(data) % 8
    for offset in range(0, whole, 8):
        word = int.from_bytes(data[offset : offset + 8], "little")
        v3 ^= word
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= word
    last = ((len(data) & 0xFF) << 56) | int.from_bytes(data[whole:], "little")
    v3 ^= last
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= last
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    digest = v0 ^ v1 ^ v2 ^ v3
    signed = digest - (1 << 64) if digest >= (1 << 63) else digest
    return -2 if signed == -1 else signed


def recipe(
    tokens: Sequence[int], chunk_size: int = 256, save_unfull_chunk: bool = True, none_hash: int = 0
) -> list[int]:
    """kvbus's reading of ChunkedTokenDatabase: h_0 = NONE_HASH, h_i+1 = hash((h_i, tuple(chunk_i), ()))."""
    end = len(tokens) if save_unfull_chunk else len(tokens) - len(tokens) % chunk_size
    hashes: list[int] = []
    prefix = none_hash
    for start in range(0, end, chunk_size):
        chunk = tokens[start : start + chunk_size]
        prefix = tuple_hash([int_hash(prefix), tuple_hash([int_hash(t) for t in chunk]), tuple_hash([])])
        hashes.append(prefix)
    return hashes


CHILD = """
import json, os, sys
import torch
from lmcache.v1 import token_database
from lmcache.v1.config import LMCacheEngineConfig
prompts = json.loads(sys.argv[1])
out = {}
for unfull in (True, False):
    # What a worker builds (its engine config; no metadata is needed for bare hashes) ...
    config = LMCacheEngineConfig.from_defaults(chunk_size=256, save_unfull_chunk=unfull,
                                               pre_caching_hash_algorithm="builtin")
    db = token_database.ChunkedTokenDatabase(config, None)
    for name, tokens in prompts.items():
        # ... fed a tensor as the engine is, and a list as the controller's /lookup is.
        from_tensor = [h for _, _, h in db.process_tokens(torch.tensor(tokens), make_key=False)]
        from_list = [h for _, _, h in db.process_tokens(tokens, make_key=False)]
        assert from_tensor == from_list, (from_tensor, from_list)
        out[f"worker/{name}/save_unfull_chunk={unfull}"] = from_tensor
# ... and what the controller's KVController builds: no config at all.
db = token_database.ChunkedTokenDatabase()
for name, tokens in prompts.items():
    out[f"controller/{name}"] = [h for _, _, h in db.process_tokens(tokens, make_key=False)]
out["NONE_HASH"] = token_database.NONE_HASH
out["hash_fn"] = getattr(db.hash_func, "__name__", repr(db.hash_func))
seed = os.environ.get("PYTHONHASHSEED")
out["hash(str(PYTHONHASHSEED))"] = None if seed is None else hash(seed)
try:
    import vllm
    out["vllm"] = vllm.__version__
except ImportError:
    out["vllm"] = None
print(json.dumps(out))
"""


def lmcache_hashes(hash_seed: str | None, python: str = sys.executable, path: str | None = None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    env["LMCACHE_LOG_LEVEL"] = "ERROR"
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = hash_seed
    if path is not None:
        env["PYTHONPATH"] = path
    done = subprocess.run(
        [python, "-c", CHILD, json.dumps(PROMPTS)], env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def check(label: str, got: dict[str, Any]) -> None:
    """The recipe, started from the NONE_HASH LMCache reported, must give LMCache's hashes exactly."""
    for name, tokens in PROMPTS.items():
        for unfull in (True, False):
            expected = recipe(tokens, save_unfull_chunk=unfull, none_hash=got["NONE_HASH"])
            assert got[f"worker/{name}/save_unfull_chunk={unfull}"] == expected, (label, name, unfull)
        assert got[f"controller/{name}"] == recipe(tokens, none_hash=got["NONE_HASH"]), (label, name)
    print(f"{label}: NONE_HASH={got['NONE_HASH']} hash={got['hash_fn']} vllm={got['vllm']}")
    for key, value in got.items():
        if key.startswith("worker/"):
            print(f"  {key}: {value}")


def with_vllm(hash_seed: str) -> dict[str, Any] | None:
    """The same code where vLLM is importable: .venv-vllm's interpreter, given lmcache's package alone.

    Only token_database and config are exercised, whose imports .venv-vllm satisfies; the rest of lmcache is
    never loaded there.
    """
    python = harness.REPO / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        return None
    import lmcache

    with tempfile.TemporaryDirectory() as shim:
        (Path(shim) / "lmcache").symlink_to(Path(lmcache.__file__).parent)
        return lmcache_hashes(hash_seed, str(python), shim)


def main() -> None:
    harness.quiet_lmcache_logs()
    harness.require_lmcache_venv()
    vectors: dict[str, Any] = {}
    for hash_seed in HASH_SEEDS:
        label = f"PYTHONHASHSEED={hash_seed}" if hash_seed is not None else "PYTHONHASHSEED unset"
        vectors[label] = lmcache_hashes(hash_seed)
        check(label, vectors[label])
    chains = [{k: v for k, v in got.items() if "/" in k} for got in vectors.values()]
    same = all(chain == chains[0] for chain in chains)
    print(f"without vLLM, PYTHONHASHSEED changes the hashes: {not same}")
    for hash_seed in ("0", "123"):
        got = with_vllm(hash_seed)
        if got is None:
            print("no .venv-vllm: the vLLM-importable case is skipped")
            break
        label = f"vLLM importable, PYTHONHASHSEED={hash_seed}"
        assert got["NONE_HASH"] == got["hash(str(PYTHONHASHSEED))"] == str_hash(hash_seed, int(hash_seed)), got
        vectors[label] = got
        check(label, got)
    print("the recipe matches LMCache in every case")
    if "--write" in sys.argv[1:]:
        document = {"chunk_size": 256, "prompts": PROMPTS, "vectors": vectors}
        harness.write_json(VECTORS, document)
        print(f"wrote {VECTORS}")


if __name__ == "__main__":
    main()
