"""One conformance suite, run on every storage backend this machine can host."""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvbus.agent import codecs
from kvbus.agent.backends.base import IndexEntry, StorageBackend, UnsupportedOperation
from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.backends.disk import LocalDiskBackend
from kvbus.agent.backends.gpu import LocalGPUBackend
from kvbus.agent.refused import Refused
from kvbus.agent.synthetic import synthetic_kv
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location
from kvbus.shared.records import BackendStats
from tests.agent.int8_bound import int8_bound

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
    pytest.param(
        lambda cap, rec, _: LocalGPUBackend(SPACE, cap, rec),
        id="gpu",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
    pytest.param(lambda cap, rec, directory: LocalDiskBackend(SPACE, directory, cap, rec), id="disk"),
]


@pytest.fixture(params=FACTORIES)
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    build: Builder = request.param
    directories = (tmp_path / f"backend-{n}" for n in itertools.count())
    return lambda cap, rec: build(cap, rec, next(directories))


def kv(tokens: list[int], fill: float = 1.0) -> list[torch.Tensor]:
    return [
        torch.full((len(c), 8), fill, dtype=torch.float16)
        for c in [tokens[i : i + SPACE.chunk_size] for i in range(0, len(tokens), SPACE.chunk_size)]
    ]


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


def test_export_and_adopt_carry_chunks_between_backends(make: Factory) -> None:
    source, target = make(1 << 20, Recorder()), make(1 << 20, Recorder())
    prompt, other = list(range(10)), [7] * 5
    source.store(prompt, kv(prompt, 2.0))
    source.store(other, kv(other, 3.0))
    entries, tensors = source.export(prompt[:9])  # the held prefix: chunks of 4 and 4 tokens
    assert [e.num_tokens for e in entries] == [4, 4] and entries[0].is_head and not entries[1].is_head
    assert target.adopt(entries, tensors) == [e.key for e in entries]
    assert target.contains(prompt) == 8 and torch.equal(target.retrieve(prompt)[1], tensors[1])
    every, tensors = source.export([])
    assert sorted(e.num_tokens for e in every) == [1, 2, 4, 4, 4]
    assert len(target.adopt(every, tensors)) == 5 and target.contains(other) == 5 and target.contains(prompt) == 10
    with pytest.raises(ValueError, match="need 5 tensors"):
        target.adopt(every, tensors[:1])


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


def test_a_clear_leaves_its_chunks_to_free_until_released(make: Factory) -> None:
    backend = make(1 << 20, Recorder())
    prompt = list(range(4000))
    backend.store(prompt, kv(prompt))
    weak = weakref.ref(backend.retrieve(prompt[:4])[0])
    assert backend.clear() == 4000
    assert len(backend) == 0 and backend.used_bytes == 0  # nothing can reach them any more
    backend.release_detached()
    assert weak() is None and not backend.holds_detached()
    backend.release_detached()  # nothing left: a no-op


# Pinning: a pinned chunk survives eviction and clear() until unpinned. The memory backends implement
# pinning and compression; a backend without them refuses (see the end of this file).


@pytest.fixture(params=[factory for factory in FACTORIES if factory.id in ("cpu", "gpu")])
def make_memory(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    build: Builder = request.param
    return lambda cap, rec: build(cap, rec, tmp_path)


def test_pin_answers_the_held_prefix_and_is_a_flag_not_a_count(make_memory: Factory) -> None:
    backend = make_memory(1 << 20, Recorder())
    prompt = list(range(10))
    backend.store(prompt, kv(prompt))
    assert backend.pin(prompt + [99]) == 8  # the 10-token tail chunk is not a prefix of 11 tokens
    assert backend.pin(prompt) == 10
    assert backend.pin(prompt) == 10
    assert backend.pin([7, 7, 7, 7]) == 0 and backend.pin([]) == 0
    assert backend.stats().pinned_chunks == 3 and backend.stats().pinned_tokens == 10
    assert backend.unpin(prompt) == 10  # once undoes any number of pins
    assert backend.unpin(prompt) == 10  # held, if no longer pinned, still counts
    assert backend.stats().pinned_chunks == 0
    assert backend.clear() == 10


def test_eviction_passes_over_pinned_chunks(make_memory: Factory) -> None:
    recorder = Recorder()
    backend = make_memory(4 * CHUNK_BYTES, recorder)
    pinned, other, newest = list(range(12)), [100, 101, 102, 103], [200, 201, 202, 203]
    backend.store(pinned, kv(pinned))
    backend.pin(pinned)
    backend.store(other, kv(other))
    assert backend.store(newest, kv(newest)) == 4
    assert backend.contains(pinned) == 12 and backend.contains(other) == 0
    assert [op[2].key for op in recorder.ops if op[0] == "evict"] == [SPACE.chunks(other)[0].key]  # type: ignore[attr-defined]
    assert backend.discard(SPACE.chunks(pinned)[0].key) == 0  # as an eviction would: pinned stays
    assert backend.used_bytes <= backend.capacity_bytes


def test_with_only_pinned_chunks_left_a_store_that_cannot_fit_stores_nothing(make_memory: Factory) -> None:
    recorder = Recorder()
    backend = make_memory(3 * CHUNK_BYTES, recorder)
    pinned = list(range(12))
    backend.store(pinned, kv(pinned))
    backend.pin(pinned)
    other = list(range(100, 108))
    assert backend.store(other, kv(other)) == 0
    assert backend.contains(pinned) == 12 and len(backend) == 3
    assert not [op for op in recorder.ops if op[0] == "evict"]
    backend.unpin(pinned)
    assert backend.store(other, kv(other)) == 8  # unpinned, the tails go first
    assert backend.contains(pinned) == 4


def test_clear_spares_pinned_chunks_counts_only_the_freed_and_lists_survivors(make_memory: Factory) -> None:
    recorder = Recorder()
    backend = make_memory(1 << 20, recorder)
    kept, freed = list(range(10)), list(range(50, 53))
    backend.store(kept, kv(kept))
    backend.store(freed, kv(freed))
    backend.pin(kept)
    assert backend.clear() == 3
    assert backend.contains(kept) == 10 and backend.contains(freed) == 0
    assert len(backend) == 3 and backend.used_bytes == 2 * CHUNK_BYTES + CHUNK_BYTES // 2
    kind, location, entries = recorder.ops[-1]
    assert (kind, location) == ("replace", backend.location)
    assert sorted(entries) == sorted(
        IndexEntry(c.key, c.num_tokens, c.start == 0)  # type: ignore[call-overload]
        for c in SPACE.chunks(kept)
    )
    assert backend.clear() == 0
    assert backend.unpin(kept) == 10
    assert backend.clear() == 10
    assert len(backend) == 0 and backend.used_bytes == 0
    assert recorder.ops[-1] == ("clear", backend.location, None)


# Compression: real codecs, smaller accounts, same lookups.


def kv_2ltd(tokens: list[int], seed: int = 0) -> list[torch.Tensor]:
    """KV_2LTD chunks [2, 2 layers, tokens, 16] in float32, random: 1 KiB per full chunk."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, 2, len(tokens[i : i + SPACE.chunk_size]), 16, generator=generator)
        for i in range(0, len(tokens), SPACE.chunk_size)
    ]


KV_CHUNK = 2 * 2 * 4 * 16 * 4
INT8_CHUNK = 2 * 2 * 4 * 16 + 2 * 2 * 16 * 4  # int8 values + a float32 scale per K/V, layer and channel


def test_int8_shrinks_used_bytes_and_lookups_still_hit_within_its_bound(make_memory: Factory) -> None:
    backend = make_memory(1 << 20, Recorder())
    prompt = list(range(12))
    original = kv_2ltd(prompt)
    backend.store(prompt, original)
    device = backend.retrieve(prompt)[0].device
    assert backend.used_bytes == 3 * KV_CHUNK
    assert backend.compress(prompt, "int8") == 12
    assert backend.used_bytes == 3 * INT8_CHUNK
    assert backend.stats().compressed_chunks == 3 and backend.stats().compressed_bytes == 3 * INT8_CHUNK
    assert backend.contains(prompt) == 12
    restored = backend.retrieve(prompt)
    for got, want in zip(restored, original, strict=True):
        assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, device)
        assert bool(((got.cpu() - want).abs() <= int8_bound(want, -2)).all())
    assert backend.compress(prompt, "int8") == 12  # already compressed with it: counted, untouched
    assert backend.compress(prompt, "zlib") == 0  # compressed with another method: left alone
    assert backend.decompress(prompt, "zlib") == 0
    assert backend.decompress(prompt, "int8") == 12
    assert backend.used_bytes == 3 * KV_CHUNK and backend.stats().compressed_chunks == 0
    assert all(torch.equal(a, b) for a, b in zip(backend.retrieve(prompt), restored, strict=True))
    assert backend.decompress(prompt, "int8") == 12  # already plain: counted


def test_zlib_round_trips_bit_exact_including_bfloat16(make_memory: Factory) -> None:
    backend = make_memory(1 << 20, Recorder())
    prompt = list(range(10))
    original = [t.to(torch.bfloat16) for t in kv_2ltd(prompt)]
    backend.store(prompt, original)
    before = backend.used_bytes
    assert backend.compress(prompt, "zlib") == 10
    assert backend.used_bytes < before
    for got, want in zip(backend.retrieve(prompt), original, strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got.cpu(), want)
    assert backend.decompress(prompt, "zlib") == 10
    assert backend.used_bytes == before
    assert all(torch.equal(a.cpu(), b) for a, b in zip(backend.retrieve(prompt), original, strict=True))


def test_int8_takes_the_standalone_agent_s_five_dimensional_chunks(make_memory: Factory) -> None:
    backend = make_memory(1 << 20, Recorder())
    prompt = list(range(12))
    backend.store(prompt, synthetic_kv(SPACE, prompt))  # [2, 4 layers, tokens, 2 heads, 16] float16
    assert backend.used_bytes == 3 * 2 * 4 * 4 * 2 * 16 * 2
    assert backend.compress(prompt, "int8") == 12
    assert backend.used_bytes == 3 * (2 * 4 * 4 * 2 * 16 + 2 * 4 * 16 * 4)  # a scale per K/V, layer, channel


def test_a_chunk_a_method_cannot_shrink_or_take_stays_plain_and_uncounted(make_memory: Factory) -> None:
    backend = make_memory(1 << 20, Recorder())
    floats, ints = list(range(8)), list(range(100, 108))
    backend.store(floats, [torch.randn(4, 8, dtype=torch.float16) for _ in range(2)])  # int8 scales cost as much
    backend.store(ints, [torch.arange(32).reshape(4, 8) for _ in range(2)])  # int8 takes floats only
    assert backend.compress(floats, "int8") == 0
    assert backend.compress(ints, "int8") == 0
    assert backend.compress(ints, "zlib") == 8
    assert backend.stats().compressed_chunks == 2


def test_compress_takes_the_held_prefix_or_with_no_tokens_everything(make_memory: Factory) -> None:
    backend = make_memory(1 << 20, Recorder())
    first, second = list(range(12)), list(range(100, 106))
    backend.store(first, kv_2ltd(first))
    backend.store(second, kv_2ltd(second, seed=1))
    assert backend.compress(first[:8] + [999] * 4, "int8") == 8
    assert backend.stats().compressed_chunks == 2
    assert backend.compress([], "int8") == 18
    assert backend.compress([5, 5, 5, 5], "int8") == 0
    assert backend.decompress([], "int8") == 18
    assert backend.stats().compressed_chunks == 0


def test_an_unknown_method_is_refused_naming_the_known_ones(make_memory: Factory) -> None:
    backend = make_memory(1 << 20, Recorder())
    prompt = list(range(4))
    backend.store(prompt, kv_2ltd(prompt))
    for operation in (backend.compress, backend.decompress):
        with pytest.raises(Refused, match="unknown compression method 'gzip'; known methods: int8, zlib"):
            operation(prompt, "gzip")
    assert backend.stats().compressed_chunks == 0


def test_compressed_chunks_leave_room_for_more(make_memory: Factory) -> None:
    recorder = Recorder()
    backend = make_memory(4 * KV_CHUNK, recorder)
    first, second = list(range(12)), list(range(100, 108))
    backend.store(first, kv_2ltd(first))
    backend.compress(first, "int8")
    assert backend.store(second, kv_2ltd(second)) == 8
    assert backend.contains(first) == 12 and backend.contains(second) == 8
    assert not [op for op in recorder.ops if op[0] == "evict"]
    # Growing back needs room: the other prompt's tail goes first, the prompt asked for stays whole.
    assert backend.decompress(first, "int8") == 12
    assert backend.used_bytes <= backend.capacity_bytes
    assert backend.contains(first) == 12 and backend.contains(second) == 4


def test_a_chunk_that_cannot_grow_back_stays_compressed_and_uncounted(make_memory: Factory) -> None:
    backend = make_memory(4 * KV_CHUNK, Recorder())
    small, big = list(range(12)), list(range(100, 108))
    backend.store(small, kv_2ltd(small))
    backend.compress(small, "int8")
    backend.store(big, kv_2ltd(big))
    backend.pin(small)
    backend.pin(big)  # nothing left to evict: room for one chunk to grow, not three
    assert backend.decompress(small, "int8") == 4
    assert backend.used_bytes == 4 * KV_CHUNK
    assert backend.stats().compressed_chunks == 2
    assert backend.contains(small) == 12 and backend.contains(big) == 8


def test_pinned_chunks_can_be_compressed_and_survive_clear_compressed(make_memory: Factory) -> None:
    backend = make_memory(1 << 20, Recorder())
    prompt = list(range(12))
    original = kv_2ltd(prompt)
    backend.store(prompt, original)
    backend.pin(prompt)
    assert backend.compress(prompt, "int8") == 12
    assert backend.clear() == 0
    stats = backend.stats()
    assert (stats.pinned_chunks, stats.compressed_chunks, stats.bytes) == (3, 3, 3 * INT8_CHUNK)
    for got, want in zip(backend.retrieve(prompt), original, strict=True):
        assert bool(((got.cpu() - want).abs() <= int8_bound(want, -2)).all())


class Bare(StorageBackend):
    """The least a backend implements: pinning and compression are left to the defaults."""

    location = Location.DISK

    def __init__(self) -> None:
        super().__init__(SPACE)
        self._chunks: dict[str, tuple[IndexEntry, torch.Tensor]] = {}

    def _put(self, entry: IndexEntry, tensor: torch.Tensor) -> bool:
        self._chunks[entry.key] = (entry, tensor.clone())
        return True

    def _get(self, key: str) -> torch.Tensor | None:
        held = self._chunks.get(key)
        return None if held is None else held[1]

    def _has(self, key: str) -> bool:
        return key in self._chunks

    def _discard(self, key: str) -> IndexEntry | None:
        held = self._chunks.pop(key, None)
        return None if held is None else held[0]

    def _clear(self) -> int:
        freed = sum(entry.num_tokens for entry, _ in self._chunks.values())
        self._chunks.clear()
        return freed

    def _entries(self) -> list[IndexEntry]:
        return [entry for entry, _ in self._chunks.values()]

    def _touch_prefix(self, keys: list[str]) -> None:
        pass

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def used_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self._chunks.values())

    @property
    def capacity_bytes(self) -> int:
        return 1 << 20


@pytest.mark.parametrize("operation", ["pin", "unpin", "compress", "decompress"])
def test_a_backend_without_pinning_or_compression_refuses_by_name(operation: str) -> None:
    backend = Bare()
    prompt = list(range(8))
    backend.store(prompt, kv(prompt))
    call = getattr(backend, operation)
    method = () if operation.endswith("pin") else ("zlib",)
    for tokens in (prompt, []):  # refused alike whether or not anything is held
        with pytest.raises(UnsupportedOperation, match=f"^LocalDiskBackend does not support {operation}$"):
            call(tokens, *method)
    if operation.endswith("compress"):
        with pytest.raises(Refused, match="known methods: int8, zlib") as refused:  # the method is checked first
            call(prompt, "snappy")
        assert not isinstance(refused.value, UnsupportedOperation)
    assert backend.clear() == 8


def test_every_backend_reports_the_same_stats(make: Factory) -> None:
    backend = Bare()
    prompt = list(range(6))
    backend.store(prompt, kv(prompt))
    assert backend.stats() == BackendStats(chunks=2, tokens=6, bytes=3 * CHUNK_BYTES // 2, capacity_bytes=1 << 20)
    other = make(1 << 20, Recorder())
    other.store(prompt, kv(prompt))
    assert other.stats() == backend.stats()


def test_clear_and_lookups_do_not_wait_for_a_codec(make_memory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = make_memory(1 << 20, Recorder())
    prompt = list(range(8))
    backend.store(prompt, kv_2ltd(prompt))
    encoding, release = threading.Event(), threading.Event()
    real_encode = codecs.encode

    def slow_encode(tensor: torch.Tensor, method: str) -> codecs.Packed:
        encoding.set()
        assert release.wait(10)
        return real_encode(tensor, method)

    monkeypatch.setattr(codecs, "encode", slow_encode)
    answers: list[int] = []
    compressing = threading.Thread(target=lambda: answers.append(backend.compress(prompt, "int8")))
    compressing.start()
    assert encoding.wait(10)
    assert backend.contains(prompt) == 8  # while the first chunk is being encoded
    assert backend.clear() == 8
    release.set()
    compressing.join(10)
    assert answers == [0]  # what was encoded was cleared meanwhile: nothing swapped in
    assert len(backend) == 0 and backend.used_bytes == 0 and backend.stats().compressed_chunks == 0


def test_concurrent_compress_decompress_store_and_clear_keep_accounts_straight(make_memory: Factory) -> None:
    backend = make_memory(16 * KV_CHUNK, Recorder())
    stop = threading.Event()

    def churn() -> None:
        for n in range(30):
            prompt = [n * 100 + i for i in range(16)]
            backend.store(prompt, kv_2ltd(prompt, seed=n))
            if n % 3 == 0:
                backend.pin(prompt[:4])
            if n % 7 == 0:
                backend.clear()
        stop.set()

    def codec(method: str) -> None:
        while not stop.is_set():
            backend.compress([], method)
            backend.decompress([], method)

    threads = [
        threading.Thread(target=churn),
        threading.Thread(target=codec, args=("int8",)),
        threading.Thread(target=codec, args=("zlib",)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert backend.used_bytes <= backend.capacity_bytes and backend.stats().chunks == len(backend)
    backend.decompress([], "int8")
    backend.decompress([], "zlib")
    stats = backend.stats()
    assert stats.compressed_chunks == 0  # the pinned chunks, at most 10, always fit plain
    assert backend.used_bytes == len(backend) * KV_CHUNK and stats.tokens == len(backend) * 4  # recounted
    assert backend.clear() == stats.tokens - stats.pinned_tokens
    assert len(backend) == stats.pinned_chunks
