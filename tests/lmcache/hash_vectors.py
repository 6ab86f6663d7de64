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

from kvbus.shared.hashing import LMCacheHashSpace, vllm_none_hash

VECTORS = Path(__file__).with_name("hash_vectors.json")
SEED_PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
RANGE_PROMPT = list(range(1000, 1600))
PROMPTS = {"seed_prompt": SEED_PROMPT, "range_1000_1600": RANGE_PROMPT}
HASH_SEEDS: list[str | None] = ["0", "123", None]


def recipe(
    tokens: Sequence[int], chunk_size: int = 256, save_unfull_chunk: bool = True, none_hash: int = 0
) -> list[int]:
    """kvbus's own reading of ChunkedTokenDatabase (shared/hashing.py), as the ints LMCache reports."""
    space = LMCacheHashSpace(chunk_size, none_hash, save_unfull_chunk)
    return [int(chunk.key) for chunk in space.chunks(tokens)]


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
        assert got["NONE_HASH"] == got["hash(str(PYTHONHASHSEED))"] == vllm_none_hash(int(hash_seed)), got
        vectors[label] = got
        check(label, got)
    print("the recipe matches LMCache in every case")
    if "--write" in sys.argv[1:]:
        document = {"chunk_size": 256, "prompts": PROMPTS, "vectors": vectors}
        harness.write_json(VECTORS, document)
        print(f"wrote {VECTORS}")


if __name__ == "__main__":
    main()
