"""LMCacheConnectorV1Impl: the body of the vLLM v1 KV-connector integration."""

from __future__ import annotations

import atexit
import importlib
import logging
from typing import Any

from lmcache.distributed.lookup.client import LookupClient
from lmcache.distributed.lookup.protocol import lookup_address
from lmcache.integration.vllm.engine_builder import (compose_from_vllm, layout_from_vllm, metadata_from_vllm,
                                                     probe_cpu_page_map)
from lmcache.integration.vllm.planner import ConnectorPlanner
from lmcache.integration.vllm.request_keys import check_supported, hash_tokens
from lmcache.integration.vllm.request_keys import request_configs as _request_configs
from lmcache.integration.vllm.specs import LMCacheConnectorMetadata

logger = logging.getLogger(__name__)


def wants_layerwise(extra_config: dict | None) -> bool:
    """Whether the lmcache configuration (``kv_connector_extra_config``, ``LMCACHE_CONFIG_FILE``,
    ``LMCACHE_*`` env) selects a layerwise gpu_connector (e.g. ``use_layerwise: true``). A bad
    configuration answers False here; the connector's constructor reports it."""
    from lmcache.gpu_connector.vllm_layerwise import VLLMPagedMemLayerwiseGPUConnector

    try:
        cfg = compose_from_vllm(dict(extra_config or {}))
        module, _, name = str(cfg.gpu_connector["_target_"]).rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001
        return False
    return isinstance(cls, type) and issubclass(cls, VLLMPagedMemLayerwiseGPUConnector)


class LMCacheConnectorV1Impl:
    """Scheduler side: lookup over ZMQ and the ConnectorPlanner; worker side: the LMCacheEngine.

    The scheduler builds no allocator and no tiers. The worker builds its engine when vLLM
    registers the KV caches (only then are kv dtype, shape and layout known) and serves lookups
    on ``ipc://…/lmcache-lookup-<engine_id>-<rank>.ipc``.

    Chunk keys carry what vLLM's block hash depends on beyond token ids (cache_salt, LoRA adapter,
    multimodal items: :mod:`lmcache.integration.vllm.request_keys`).

    Args:
        vllm_config: vLLM's VllmConfig (``kv_transfer_config`` must be set).
        is_scheduler: True for the scheduler-side instance.
        connector: the owning LMCacheConnectorV1Dynamic (source of the bound metadata).
    Raises:
        ValueError: a bad lmcache configuration (unknown key, bad value) or kv_role; prompt
            embeddings or pipeline parallelism (whose KV lmcache cannot name).
    """

    def __init__(self, vllm_config, is_scheduler: bool, connector):
        check_supported(vllm_config)
        self._vllm_config = vllm_config
        self._connector = connector
        kvt = vllm_config.kv_transfer_config
        self.cfg = compose_from_vllm({k: v for k, v in (kvt.kv_connector_extra_config or {}).items()})
        self.kv_role = kvt.kv_role or "kv_both"
        self.block_size = int(vllm_config.cache_config.block_size)
        self.chunk_size = int(self.cfg.chunk_size)
        self.engine_id = str(kvt.engine_id)
        self.tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
        self.container = None
        self.worker = None
        self.layerwise_worker = None  # the worker, when the engine's gpu_connector is layerwise
        self.lookup_server = None
        self.manager = None  # lmcache.lmcache_manager.LMCacheManager of this side
        if is_scheduler:
            from lmcache.config.checks import check_config

            check_config(self.cfg, role="scheduler")  # bad values fail at start, not at first use
            self.planner = ConnectorPlanner(self.chunk_size, self.block_size, self.kv_role,
                                            bool(self.cfg.get("save_decode_cache", False)))
            timeout_ms = int(self.cfg.get("lookup_timeout_ms", 3000))
            self.lookup_client = LookupClient([lookup_address(self.engine_id, r) for r in range(self.tp_size)],
                                              timeout_ms=timeout_ms)
            self._requests: dict[str, Any] = {}
            from lmcache.lmcache_manager import LMCacheManager

            self.manager = LMCacheManager("scheduler", self.cfg, lookup_client=self.lookup_client).start()
            self._pending_unpins: list[str] = []

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        """Scheduler: tokens vLLM may take from lmcache beyond its own ``num_computed_tokens``
        (lookup over ZMQ, pins held until the request's load); never asynchronous (False)."""
        if self.kv_role == "kv_producer":
            return 0, False
        tokens = hash_tokens(request)
        if self.cfg.get("blend") is not None and num_computed_tokens > 0:
            hit = 0  # CacheBlend fills the context from token 0; vLLM's own prefix hit wins
        else:
            hit = self.lookup_client.lookup(tokens, request.request_id, _request_configs(request))
        need = self.planner.on_lookup(request.request_id, len(tokens), num_computed_tokens, hit)
        return need, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        """Scheduler: vLLM allocated blocks; ``num_external_tokens`` > 0 turns the lookup into a load."""
        self._requests[request.request_id] = request
        self.planner.on_alloc(request.request_id, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> LMCacheConnectorMetadata:
        """Scheduler: this step's LoadSpec/SaveSpec per request (ReqMeta) and the pins to release."""
        meta = LMCacheConnectorMetadata(unpin_ids=self._pending_unpins)
        self._pending_unpins = []
        for req_id in scheduler_output.finished_req_ids:
            self.planner.finish(req_id)
            self._requests.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            request = self._requests.get(new.req_id)
            tokens = hash_tokens(request) if request is not None else list(new.prompt_token_ids or [])
            prompt_len = len(new.prompt_token_ids or tokens)
            plan, unpin = self.planner.plan_new(
                new.req_id, tokens, prompt_len, new.block_ids[0], new.num_computed_tokens,
                scheduler_output.num_scheduled_tokens.get(new.req_id, 0),
                _request_configs(request) if request is not None else None)
            if plan is not None:
                meta.requests.append(plan)
            if unpin:
                meta.unpin_ids.append(new.req_id)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            request = self._requests.get(req_id)
            if request is None:
                continue
            new_blocks = cached.new_block_ids[i]
            plan = self.planner.plan_cached(
                req_id, hash_tokens(request), None if new_blocks is None else new_blocks[0],
                req_id in cached.resumed_req_ids, cached.num_computed_tokens[i],
                scheduler_output.num_scheduled_tokens.get(req_id, 0))
            if plan is not None:
                meta.requests.append(plan)
        return meta

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        """Scheduler: a request ended; its lookup pins are released with the next step's metadata.
        Returns (False, None): saves are synchronous, vLLM may free the blocks at once."""
        # Release lookup pins of a request that never reached a worker (aborted, rejected).
        self._pending_unpins.append(request.request_id)
        return False, None

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict) -> None:
        """Worker: build the engine for vLLM's paged KV tensors (layer name → tensor), measure the
        CPU page order when on CPU, and start the LookupServer.

        Raises:
            ValueError: tensors that fit no known layout, or a bad lmcache configuration.
        """
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import extract_layer_index
        from vllm.platforms import current_platform

        from lmcache.containers import build_worker_container
        from lmcache.distributed.lookup.server import LookupServer
        from lmcache.integration.vllm.worker import ConnectorWorker

        names = sorted(kv_caches, key=extract_layer_index)
        tensors = [kv_caches[n] for n in names]
        model_config = self._vllm_config.model_config
        use_mla, is_cpu = bool(model_config.use_mla), current_platform.is_cpu()
        page_map = None
        if is_cpu and not use_mla:
            page_map = probe_cpu_page_map(tensors[0].shape[2], model_config.get_head_size(), tensors[0].dtype,
                                          self._cpu_attention_isa(names[0], tensors[0]))
        layout = layout_from_vllm(tensors[0], model_config.get_head_size(), use_mla, is_cpu, page_map)
        if layout.kind == "mla" and tensors[0].dim() == 4:
            tensors = [t.squeeze(1) for t in tensors]  # [B, 1, N, C] → [B, N, C]
        rank = get_tensor_model_parallel_rank()
        metadata = metadata_from_vllm(self._vllm_config, tensors, layout, self.chunk_size, rank)
        self.container = build_worker_container(self.cfg, metadata, layout)
        try:
            engine = self.container.engine()
            self.container.lmcache_worker()  # controller=lmcache_worker: report to the controller
        except BaseException:
            self.shutdown()  # release what was built (e.g. the allocator) before reporting
            raise
        runner = self._blend_runner(names)
        lookup_target = engine if runner is None else runner
        if runner is not None:
            from lmcache.integration.vllm.blend_worker import BlendConnectorWorker

            self.worker = BlendConnectorWorker(engine, tensors, layout.block_size, runner)
        elif engine.is_layerwise:
            from lmcache.integration.vllm.layerwise_worker import LayerwiseConnectorWorker

            self.worker = self.layerwise_worker = LayerwiseConnectorWorker(
                engine, tensors, layout.block_size, names)
        else:
            self.worker = ConnectorWorker(engine, tensors, layout.block_size)
        self.lookup_server = LookupServer(lookup_target, lookup_address(self.engine_id, rank))
        from lmcache.containers import shutdown as shutdown_graph
        from lmcache.lmcache_manager import LMCacheManager

        self.manager = LMCacheManager("worker", self.cfg, rank, engine, self.lookup_server,
                                      shutdown_graph=lambda c=self.container: shutdown_graph(c)).start()
        # vLLM does not always shut workers down at interpreter exit; pending tier writes
        # (e.g. the disk tier's queue) must still be flushed.
        atexit.register(self.shutdown)
        logger.info("lmcache worker %d ready: %s, layout %s%s, lookup at %s", rank, metadata, layout.kind,
                    ", layerwise" if engine.is_layerwise else "", self.lookup_server.address)

    def _blend_runner(self, layer_names: list[str]):
        """The container's CacheBlendRunner (``blend=cacheblend``) with this worker's model
        attached, or None without blending.

        Raises:
            ValueError: tensor parallelism > 1, or a model CacheBlend cannot run (named).
        """
        try:
            runner = self.container.blender()
            if runner is None:
                return None
            if self.tp_size != 1:
                raise ValueError(f"blend=cacheblend needs tensor_parallel_size 1, got {self.tp_size} "
                                 "(the Blender runs the model's layers on one worker)")
            from lmcache.integration.vllm.blend_worker import find_vllm_model

            layer = self._vllm_config.compilation_config.static_forward_context.get(layer_names[0])
            runner.attach_model(find_vllm_model(layer))
        except BaseException:
            self.shutdown()
            raise
        return runner

    def _cpu_attention_isa(self, layer_name: str, kv_cache) -> str:
        """The ISA vLLM's CPU attention chose for ``layer_name`` (set on the layer by its metadata
        builder; recomputed with vLLM's own rule when absent)."""
        layer = self._vllm_config.compilation_config.static_forward_context.get(layer_name)
        isa = getattr(layer, "isa", None)
        if isa is None:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            isa = _get_attn_isa(self._vllm_config.model_config.dtype, kv_cache.shape[2],
                                self._vllm_config.model_config.get_head_size(),
                                self._vllm_config.cache_config.cache_dtype)
        return isa

    def start_load_kv(self, forward_context, **kwargs) -> None:
        """Worker: run this step's loads (all layers at once, or start the layerwise ones)."""
        if self.worker is not None:
            self.worker.load(self._connector._get_connector_metadata())

    def wait_for_save(self) -> None:
        """Worker: store this step's new chunks after the forward pass (or finish layerwise stores)."""
        if self.worker is not None:
            self.worker.save(self._connector._get_connector_metadata())

    # layerwise hooks (no-ops unless gpu_connector is layerwise; see layerwise_worker.py)
    def begin_step(self) -> None:
        if self.layerwise_worker is not None:
            self.layerwise_worker.begin_step()

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.layerwise_worker is not None:
            self.layerwise_worker.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str) -> None:
        if self.layerwise_worker is not None:
            self.layerwise_worker.save_layer(layer_name, self._connector._get_connector_metadata())

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Worker: ids of blocks lmcache could not deliver since the last call (vLLM recomputes them)."""
        return set() if self.worker is None else self.worker.take_invalid_block_ids()

    def shutdown(self) -> None:
        """Close the lookup server/client and the component graph (idempotent; flushes tier writes)."""
        if getattr(self, "manager", None) is not None:  # it owns all of them once made
            self.manager.close()
            self.manager = None
            self.lookup_server = self.container = self.lookup_client = None
        if self.lookup_server is not None:
            self.lookup_server.close()
            self.lookup_server = None
        self.layerwise_worker = None
        if self.container is not None:
            from lmcache.containers import shutdown
            shutdown(self.container)
            self.container = None
        if getattr(self, "lookup_client", None) is not None:
            self.lookup_client.close()
            self.lookup_client = None
