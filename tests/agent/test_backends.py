"""One conformance suite, run on every storage backend this machine can host."""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvbus.agent.backends.base import IndexEntry, StorageBackend
from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.backends.disk import LocalDiskBackend
from kvbus.agent.backends.gpu import LocalGPUBackend
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location

SPACE = HashSpace("test/model", chunk_size=4)
CHUNK_BYTES = 4 * 8 * 2  # 4 tokens x 8 values x fp16


class Recorder:
    """An IndexListener that keeps the ops it was told, in order."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, Location, object]] = []

    def admitted(self, location: Location, entry: IndexEntry) -> None:
        self.ops.append(("admit", location, entry))

    def evicted(self, location: Location, entry: IndexEntry) -> None:
        self.ops.append(("evict", location, entry))

    def cleared(self, location: Location) -> None:
        self.ops.append(("clear", location, None))

    def replaced(self, location: Location, entries: list[IndexEntry]) -> None:
        self.ops.append(("replace", location, entries))


Factory = Callable[[int, Recorder], StorageBackend]
# Builders take a directory of their own too, which only the disk backend uses.
Builder = Callable[[int, Recorder, Path], StorageBackend]

FACTORIES = [
    pytest.param(lambda cap, rec, _: LocalCPUBackend(SPACE, cap, rec), id="cpu"),
    pytest.param(lambda cap, rec, _: LocalGPUBackend(SPACE, cap, rec), id="gpu", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")),
    pytest.param(lambda cap, rec, directory: LocalDiskBackend(SPACE, directory, cap, rec), id="disk"),
]


@pytest.fixture(params=FACTORIES)
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    build: Builder = request.param
    directories = (tmp_path / f"backend-{n}" for n in itertools.count())
    return lambda cap, rec: build(cap, rec, next(directories))


def kv(tokens: list[int], fill: float = 1.0) -> list[torch.Tensor]:
    return [torch.full((len(c), 8), fill, dtype=torch.float16) for c in
            [tokens[i: i + SPACE.chunk_size] for i in range(0, len(tokens), SPACE.chunk_size)]]


def test_store_then_retrieve_and_contains_by_prefix(make: Factory) -> None:
    backend = make(1 << 20, Recorder())
    prompt = list(range(10))
    assert backend.store(prompt, kv(prompt, 2.0)) == 10
    assert backend.contains(prompt) == 10
    assert backend.contains(prompt[:8]) == 8
    assert backend.contains(prompt[:6]) == 4  # the 2-token tail chunk of a 6-token prompt is a different chunk
    assert backend.contains(list(range(1, 10))) == 0
    tensors = backend.retrieve(prompt + [99])
    assert len(tensors) == 2  # the 11-token prompt shares only its two full chunks
    assert all(float(t.float().mean()) == 2.0 for t in tensors)
    assert len(backend) == 3


def test_the_backend_keeps_its_own_copy(make: Factory) -> None:
    backend = make(1 << 20, Recorder())
    prompt = [1, 2, 3, 4]
    source = kv(prompt)
    backend.store(prompt, source)
    source[0].fill_(7)
    assert float(backend.retrieve(prompt)[0].float().max()) == 1.0


def test_empty_input_holds_nothing(make: Factory) -> None:
    backend = make(1 << 20, Recorder())
    assert backend.store([], []) == 0
    assert backend.contains([]) == 0
    assert backend.retrieve([]) == []


def test_a_hole_ends_the_prefix(make: Factory) -> None:
    backend = make(1 << 20, Recorder())
    prompt = list(range(12))
    backend.store(prompt, kv(prompt))
    second = SPACE.chunks(prompt)[1]
    assert backend.discard(second.key) == 4
    assert backend.discard(second.key) == 0
    assert backend.contains(prompt) == 4
    assert len(backend.retrieve(prompt)) == 1


def test_tensor_count_must_match_chunk_count(make: Factory) -> None:
    backend = make(1 << 20, Recorder())
    with pytest.raises(ValueError, match="need 3 tensors"):
        backend.store(list(range(10)), kv(list(range(8))))


def test_lru_eviction_respects_capacity_and_takes_tails_first(make: Factory) -> None:
    recorder = Recorder()
    backend = make(4 * CHUNK_BYTES, recorder)
    first, second = list(range(12)), list(range(100, 112))
    backend.store(first, kv(first))
    backend.store(second, kv(second))
    assert backend.used_bytes <= backend.capacity_bytes == 4 * CHUNK_BYTES
    assert len(backend) == 4
    # The older prompt lost its tail first, so what is left of it is still a usable prefix.
    assert backend.contains(first) == 4
    assert backend.contains(second) == 12
    evicted = [op[2] for op in recorder.ops if op[0] == "evict"]
    assert [e.key for e in evicted] == [c.key for c in SPACE.chunks(first)][:0:-1]  # type: ignore[attr-defined]


def test_a_chunk_larger_than_capacity_is_refused(make: Factory) -> None:
    backend = make(CHUNK_BYTES - 1, Recorder())
    assert backend.store([1, 2, 3, 4], kv([1, 2, 3, 4])) == 0
    assert len(backend) == 0


def test_clear_frees_everything_and_reports_tokens(make: Factory) -> None:
    recorder = Recorder()
    backend = make(1 << 20, recorder)
    a, b = list(range(10)), list(range(50, 53))
    backend.store(a, kv(a))
    backend.store(b, kv(b))
    assert backend.clear() == 13
    assert len(backend) == 0 and backend.used_bytes == 0
    assert backend.contains(a) == 0
    assert backend.clear() == 0
    assert recorder.ops[-1] == ("clear", backend.location, None)


def test_the_listener_hears_every_admission_once_in_order(make: Factory) -> None:
    recorder = Recorder()
    backend = make(1 << 20, recorder)
    prompt = list(range(10))
    backend.store(prompt, kv(prompt))
    backend.store(prompt, kv(prompt))  # already held: no new admissions
    admitted = [op[2] for op in recorder.ops if op[0] == "admit"]
    chunks = SPACE.chunks(prompt)
    assert admitted == [IndexEntry(c.key, c.num_tokens, c.start == 0) for c in chunks]
    backend.publish_all()
    kind, location, entries = recorder.ops[-1]
    assert (kind, location) == ("replace", backend.location)
    assert sorted(entries, key=lambda e: e.key) == sorted(admitted, key=lambda e: e.key)  # type: ignore[arg-type]


def test_concurrent_stores_keep_accounts_straight(make: Factory) -> None:
    backend = make(64 * CHUNK_BYTES, Recorder())

    def worker(offset: int) -> None:
        for n in range(50):
            prompt = [offset * 10_000 + n * 16 + i for i in range(16)]
            backend.store(prompt, kv(prompt))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(backend) == 64
    assert backend.used_bytes == 64 * CHUNK_BYTES


def test_memory_from_a_clear_is_back_before_new_chunks_are_admitted(make: Factory) -> None:
    backend = make(1 << 20, Recorder())
    prompt = list(range(4000))
    backend.store(prompt, kv(prompt))
    weak = weakref.ref(backend.retrieve(prompt[:4])[0])
    assert backend.clear() == 4000
    other = [1, 2, 3, 4]
    assert backend.store(other, kv(other)) == 4  # waits for the detached chunks to be released
    assert weak() is None
    assert len(backend) == 1 and backend.used_bytes == CHUNK_BYTES
