"""The worker side: whole blocks from a fake paged cache into a real CPU backend and back, and what
happens when chunks vanish between the scheduler's lookup and the load."""

from __future__ import annotations

import pytest
import torch

from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.connector_plan import LoadSpec, SaveSpec
from kvbus.agent.paged_blocks import BlockMover, Layout, PagedKV
from kvbus.shared.hashing import HashSpace

SPACE = HashSpace("test/model", chunk_size=8)
BLOCK = 4
NUM_BLOCKS = 32
LAYERS = 3


def caches(block_dim: int, seed: int) -> list[torch.Tensor]:
    """Per-layer caches with the block axis at `block_dim`: 0 like vLLM's CPU backend, 1 like [2, blocks, ...]."""
    generator = torch.Generator().manual_seed(seed)
    shape = [NUM_BLOCKS, 2, BLOCK, 6] if block_dim == 0 else [2, NUM_BLOCKS, BLOCK, 2, 3]
    return [torch.randn(shape, generator=generator).to(torch.bfloat16) for _ in range(LAYERS)]


def block(layers: list[torch.Tensor], block_dim: int, block_id: int) -> torch.Tensor:
    return torch.stack([layer.select(block_dim, block_id) for layer in layers])


@pytest.fixture(params=[0, 1], ids=["blocks-first", "kv-first"])
def block_dim(request: pytest.FixtureRequest) -> int:
    return request.param  # type: ignore[no-any-return]


def mover(store: LocalCPUBackend, layers: list[torch.Tensor], block_dim: int) -> BlockMover:
    return BlockMover(store, PagedKV(layers, block_dim, BLOCK), SPACE)


def test_a_saved_prompt_loads_into_other_blocks_of_another_cache_bit_for_bit(block_dim: int) -> None:
    store = LocalCPUBackend(SPACE, 1 << 20)
    source, target = caches(block_dim, 1), caches(block_dim, 2)
    prompt = list(range(21))  # chunks of 8, 8 and 5 tokens: blocks 2 + 2 + 2 (the last one partly filled)
    saver = mover(store, source, block_dim)
    saver.load([])
    saver.save([SaveSpec("a", prompt, [3, 9, 4, 10, 5, 11])])
    assert store.contains(prompt) == 21
    loader = mover(store, target, block_dim)
    # What the planner asks for a full hit of 21 tokens: 20 tokens are whole blocks, at most 20 are loadable.
    loader.load([LoadSpec("b", prompt, 0, [20, 21, 22, 23, 24])])
    assert loader.take_failed_blocks() == set()
    for src, dst in zip([3, 9, 4, 10, 5], [20, 21, 22, 23, 24], strict=True):
        assert torch.equal(block(target, block_dim, dst), block(source, block_dim, src))


def test_a_load_may_start_past_the_engines_own_blocks(block_dim: int) -> None:
    store = LocalCPUBackend(SPACE, 1 << 20)
    source, target = caches(block_dim, 1), caches(block_dim, 2)
    prompt = list(range(17))
    untouched = block(target, block_dim, 0).clone()
    mover(store, source, block_dim).save([SaveSpec("a", prompt, [1, 2, 3, 4, 5])])
    mover(store, target, block_dim).load([LoadSpec("b", prompt[:16], 1, [7, 8, 9])])
    assert torch.equal(block(target, block_dim, 0), untouched)
    for src, dst in zip([2, 3, 4], [7, 8, 9], strict=True):
        assert torch.equal(block(target, block_dim, dst), block(source, block_dim, src))


def test_a_chunk_cleared_before_the_load_reports_its_blocks_and_is_not_saved_back(block_dim: int) -> None:
    store = LocalCPUBackend(SPACE, 1 << 20)
    source, target = caches(block_dim, 1), caches(block_dim, 2)
    prompt = list(range(25))
    mover(store, source, block_dim).save([SaveSpec("a", prompt, [1, 2, 3, 4, 5, 6, 7])])
    store.discard(SPACE.chunks(prompt)[1].key)  # what a clear or an eviction does after the lookup
    before = block(target, block_dim, 22).clone()
    loader = mover(store, target, block_dim)
    loader.load([LoadSpec("b", prompt[:24], 0, [20, 21, 22, 23, 24, 25])])
    assert loader.take_failed_blocks() == {22, 23, 24, 25}
    assert loader.take_failed_blocks() == set()
    assert torch.equal(block(target, block_dim, 20), block(source, block_dim, 1))
    assert torch.equal(block(target, block_dim, 22), before)  # left for the engine to recompute
    # The same step's save must not keep what the failed blocks hold; the chunk before them is fine.
    store.clear()
    loader.save([SaveSpec("b", prompt, [20, 21, 22, 23, 24, 25, 26])])
    assert store.contains(prompt) == 8


def test_everything_gone_fails_every_block_and_the_next_step_saves_normally(block_dim: int) -> None:
    store = LocalCPUBackend(SPACE, 1 << 20)
    layers = caches(block_dim, 1)
    prompt = list(range(16))
    loader = mover(store, layers, block_dim)
    loader.load([LoadSpec("b", prompt[:8], 0, [1, 2])])
    assert loader.take_failed_blocks() == {1, 2}
    loader.save([SaveSpec("b", prompt, [1, 2, 3, 4])])
    assert store.contains(prompt) == 0
    loader.load([])  # the recompute step
    loader.save([SaveSpec("b", prompt, [1, 2, 3, 4])])
    assert store.contains(prompt) == 16


def test_a_chunk_of_another_shape_is_refused_not_loaded(block_dim: int) -> None:
    store = LocalCPUBackend(SPACE, 1 << 20)
    prompt = list(range(8))
    store.store(prompt, [torch.zeros(LAYERS, 2, 5, dtype=torch.bfloat16)])
    target = caches(block_dim, 2)
    before = block(target, block_dim, 3).clone()
    loader = mover(store, target, block_dim)
    loader.load([LoadSpec("b", prompt, 0, [3, 4])])
    assert loader.take_failed_blocks() == {3, 4}
    assert torch.equal(block(target, block_dim, 3), before)


def test_layers_must_agree() -> None:
    with pytest.raises(ValueError, match="differ"):
        PagedKV([torch.zeros(4, 2, 4, 6), torch.zeros(4, 2, 4, 8)], 0, BLOCK)


def test_layout_tags_round_trip_and_an_unknown_backend_matches_any() -> None:
    worker = Layout("meta-llama/Llama-3.1-8B-Instruct", "bfloat16", 128, "CPU_ATTN:vec")
    assert Layout.parse(str(worker)) == worker
    scheduler = Layout("meta-llama/Llama-3.1-8B-Instruct", "bfloat16", 128)
    assert Layout.parse(str(scheduler)) == scheduler
    assert worker.compatible(scheduler) and scheduler.compatible(worker)
    assert not worker.compatible(Layout("meta-llama/Llama-3.1-8B-Instruct", "bfloat16", 16, "FLASH_ATTN"))
    assert not worker.compatible(Layout("meta-llama/Llama-3.1-8B-Instruct", "float16", 128, "CPU_ATTN:vec"))
    assert not worker.compatible(Layout("meta-llama/Llama-3.1-8B-Instruct", "bfloat16", 128, "CPU_ATTN:amx"))
    with pytest.raises(ValueError):
        Layout.parse("no tag")
