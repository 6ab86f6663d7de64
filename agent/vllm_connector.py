"""KVBusConnector: the kvbus agent inside vLLM (0.32), through vLLM's KV connector API (v1).

    --kv-transfer-config '{"kv_connector": "KVBusConnector", "kv_role": "kv_both",
                           "kv_connector_module_path": "kvbus.agent.vllm_connector"}'

The only kvbus module that imports vllm. vLLM builds the connector twice, in two processes: the
scheduler side (EngineCore) counts a request's hits in the instance's Redis index and plans each
step (connector_plan.py); the worker side runs the agent, which holds the chunks and answers the
controller's commands, and moves whole blocks between vLLM's KV cache and it (paged_blocks.py).

Configuration is the engine yaml at $LMCACHE_CONFIG_FILE (with LMCACHE_<KEY> overrides); any
kvbus key in `kv_connector_extra_config` overrides it.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

from kvbus.agent.agent import Agent
from kvbus.agent.connector_plan import StepPlan, StepPlanner
from kvbus.agent.index_reader import IndexReader
from kvbus.agent.paged_blocks import BlockMover, Layout, PagedKV
from kvbus.shared import config as kvbus_config
from kvbus.shared import redis_conn
from kvbus.shared.hashing import HashSpace
from kvbus.shared.locations import Location

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvbus.agent.vllm")

# How long a forward waits for its saves to reach the index: a healthy Redis takes about a millisecond.
INDEX_WAIT_S = 0.25


class KVBusConnectorMetadata(KVConnectorMetadata):
    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class KVBusConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _log_through_vllm()
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None  # the base class refuses to start without it
        self._config = _config(transfer.kv_connector_extra_config)
        model = vllm_config.model_config.served_model_name
        self._space = HashSpace(model, self._config.chunk_size, self._config.save_unfull_chunk)
        block_size = vllm_config.cache_config.block_size
        self._layout = Layout(model, _dtype_name(vllm_config), block_size)
        self._agent: Agent | None = None
        self._mover: BlockMover | None = None
        self._stopping = threading.Event()
        if role == KVConnectorRole.SCHEDULER:
            if transfer.kv_load_failure_policy != "recompute":
                # vLLM's default fails a request whose load fails; a chunk cleared between the lookup
                # and the load must only cost a recompute. The scheduler reads this after building us.
                log.info("kvbus sets kv_load_failure_policy to 'recompute' (was %r)", transfer.kv_load_failure_policy)
                transfer.kv_load_failure_policy = "recompute"
            self._planner = StepPlanner(self._space, block_size)
            self._reader = IndexReader(
                redis_conn.connect(self._config.redis_url, request_path=True),
                self._config.lmcache_instance_id,
                worker_id=0,
                location=Location.CPU,
                layout=self._layout,
            )

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        prompt = request.prompt_token_ids
        if not prompt:
            return 0, False
        hits = self._planner.matched_tokens(request.request_id, prompt, num_computed_tokens, self._reader.held)
        return hits, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if request.prompt_token_ids:
            (block_ids,) = blocks.get_block_ids()
            self._planner.allocated(request.request_id, request.prompt_token_ids, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if new.prompt_token_ids:
                (block_ids,) = new.block_ids
                self._planner.scheduled(
                    new.req_id,
                    new.prompt_token_ids,
                    block_ids,
                    new.num_computed_tokens,
                    scheduled.get(new.req_id, 0),
                    replace_blocks=True,
                )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            self._planner.scheduled(
                req_id,
                None,
                new_blocks[0] if new_blocks else [],
                cached.num_computed_tokens[i],
                scheduled.get(req_id, 0),
                replace_blocks=req_id in cached.resumed_req_ids,
            )
        return KVBusConnectorMetadata(self._planner.take_plan())

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._planner.finished(request.request_id)
        return False, None

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """vLLM's caches exist: start the agent, registered under this cache's layout."""
        layers = list(kv_caches.values())
        num_blocks = self._kv_cache_config.num_blocks
        block_dim = next((d for d, size in enumerate(layers[0].shape) if size == num_blocks), None)
        if block_dim is None:
            raise ValueError(
                f"kvbus: no dimension of the KV cache {tuple(layers[0].shape)} counts the "
                f"{num_blocks} blocks; this attention backend's layout is not supported"
            )
        layout = Layout(
            self._layout.model,
            self._layout.dtype,
            self._layout.block_size,
            _backend_name(self._vllm_config, list(kv_caches)),
        )
        paged = PagedKV(layers, block_dim, self._layout.block_size)
        self._agent = Agent(
            self._config, model=self._space.model, worker_id=get_tensor_model_parallel_rank(), layout=str(layout)
        )
        # vLLM serves (uncached) while Redis is away; chunks saved meanwhile are published at registration.
        threading.Thread(
            target=self._agent.start_when_reachable, args=(self._stopping,), name="kvbus-agent-start", daemon=True
        ).start()
        self._mover = BlockMover(self._agent.tiers, paged, self._space)
        log.info("kvbus connector: %d layers of blocks %s, layout %s", len(layers), paged.block_shape, layout)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._metadata()
        if self._mover is not None:
            self._mover.load(meta.plan.loads)

    def _metadata(self) -> KVBusConnectorMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVBusConnectorMetadata):
            raise TypeError(
                f"kvbus: this step's connector metadata is a {type(meta).__name__}, not the "
                "KVBusConnectorMetadata build_connector_meta makes; is another connector configured?"
            )
        return meta

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads finish in start_load_kv, before the forward."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Saves copy every layer at once in wait_for_save."""

    def wait_for_save(self) -> None:
        meta = self._metadata()
        if self._mover is None or not meta.plan.saves:
            return
        self._mover.save(meta.plan.saves)
        assert self._agent is not None
        # So that the next step's lookup sees these chunks. This is the forward's path: it waits for
        # the writer thread a moment at most, and not at all while a stalled Redis keeps it behind.
        # (A Redis in trouble is logged by the writer thread, which goes on trying.)
        self._agent.index.written_within(INDEX_WAIT_S)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._mover.take_failed_blocks() if self._mover is not None else set()

    def shutdown(self) -> None:
        self._stopping.set()
        if self._agent is not None:
            self._agent.stop()
            self._agent = None


def _log_through_vllm() -> None:
    """kvbus's lines go where vLLM's go, in its format, unless the host set up kvbus logging itself."""
    ours, theirs = logging.getLogger("kvbus"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level or logging.INFO)
    ours.propagate = False


def _config(extra: dict[str, Any]) -> kvbus_config.KVBusConfig:
    config = kvbus_config.load().with_overrides(**extra)
    kvbus_config.check_devices(config)  # at start-up, in both roles, rather than at the first KV registration
    return config


def _dtype_name(vllm_config: VllmConfig) -> str:
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype != "auto":
        return str(cache_dtype)
    return str(vllm_config.model_config.dtype).removeprefix("torch.")


def _backend_name(vllm_config: VllmConfig, layer_names: list[str]) -> str:
    """The attention backend, and the CPU kernel's ISA where it has one: both decide a block's interior."""
    layer = next(iter(get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names).values()), None)
    if layer is None:
        return "unknown"
    name = layer.get_attn_backend().get_name()
    isa = getattr(layer, "isa", None)
    return f"{name}:{isa}" if isa else name
