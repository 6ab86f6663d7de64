from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvbus.shared.hashing import chunk_keys

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def keys_of(tokens: list[int], **kwargs: object) -> list[str]:
    options: dict[str, object] = {"model": MODEL, "chunk_size": 4, **kwargs}
    return [c.key for c in chunk_keys(tokens, **options)]  # type: ignore[arg-type]


def test_chunks_cover_the_tokens_in_order() -> None:
    chunks = chunk_keys(list(range(10)), model=MODEL, chunk_size=4)
    assert [(c.start, c.end, c.num_tokens) for c in chunks] == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]


def test_a_partial_chunk_is_keyed_only_when_asked() -> None:
    assert len(keys_of(list(range(10)), save_unfull_chunk=False)) == 2
    assert keys_of(list(range(3)), save_unfull_chunk=False) == []
    assert keys_of(list(range(10)))[:2] == keys_of(list(range(10)), save_unfull_chunk=False)


def test_each_key_commits_to_the_whole_prefix() -> None:
    a = keys_of([1, 2, 3, 4, 5, 6, 7, 8])
    b = keys_of([1, 2, 3, 4, 5, 6, 7, 9])
    c = keys_of([0, 2, 3, 4, 5, 6, 7, 8])
    assert a[0] == b[0] and a[1] != b[1]
    assert a[0] != c[0] and a[1] != c[1]  # same chunk tokens, different prefix
    assert len(set(a)) == 2


def test_models_never_share_keys() -> None:
    assert set(keys_of([1, 2, 3, 4])).isdisjoint(keys_of([1, 2, 3, 4], model="other/model"))


def test_keys_are_stable_across_processes_and_hash_seeds() -> None:
    code = (
        "import json; from kvbus.shared.hashing import chunk_keys; "
        f"print(json.dumps([c.key for c in chunk_keys(list(range(600)), model={MODEL!r}, chunk_size=256)]))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, check=True, capture_output=True, text=True
        ).stdout
        for seed in ("0", "1", "random")
    }
    assert len(outputs) == 1
    assert json.loads(outputs.pop()) == [c.key for c in chunk_keys(list(range(600)), model=MODEL, chunk_size=256)]


def test_a_known_vector_pins_the_scheme() -> None:
    # Changing the scheme orphans every index entry in a running fleet; make it a deliberate act.
    seed = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
    assert [c.key for c in chunk_keys(seed, model=MODEL, chunk_size=256)] == ["9b2bd90660043b5d7538850ed2b0bd6f"]


@pytest.mark.parametrize("bad", [[-1], [2**32], [1.5], ["7"]])
def test_invalid_tokens_are_refused(bad: list[object]) -> None:
    with pytest.raises(ValueError, match="token ids"):
        chunk_keys(bad, model=MODEL, chunk_size=4)  # type: ignore[arg-type]


def test_empty_input_has_no_chunks_and_bad_chunk_size_is_refused() -> None:
    assert chunk_keys([], model=MODEL, chunk_size=4) == []
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_keys([1], model=MODEL, chunk_size=0)


def test_a_hash_space_round_trips_through_its_registered_name() -> None:
    from kvbus.shared.hashing import HashSpace

    space = HashSpace("org/model:v2", 128)
    assert space.name == "128:org/model:v2"
    assert HashSpace.from_name(space.name) == space
    assert space.chunks(list(range(300))) == chunk_keys(list(range(300)), model="org/model:v2", chunk_size=128)
    for bad in ("model", "0:model", "x:model", "256:"):
        with pytest.raises(ValueError, match="not a hash space name"):
            HashSpace.from_name(bad)
