"""LMCacheConnectorV1Dynamic: lmcache as vLLM's v1 KV connector.

Use it with ``KVTransferConfig(kv_connector="LMCacheConnectorV1Dynamic",
kv_connector_module_path="lmcache.integration.vllm.lmcache_connector_v1", kv_role="kv_both",
kv_connector_extra_config={"lmcache.chunk_size": 256, ...})``. The contract is vLLM's
``vllm/distributed/kv_transfer/kv_connector/v1/base.py`` (vLLM 0.32).
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmcache.integration.vllm.connector_impl import LMCacheConnectorV1Impl


class LMCacheConnectorV1Dynamic(KVConnectorBase_V1):
    """vLLM ``KVConnectorBase_V1`` that delegates to :class:`LMCacheConnectorV1Impl`.

    Loads are synchronous in ``start_load_kv`` (all layers at once); saves run in
    ``wait_for_save`` after the forward pass wrote the KV. With ``use_layerwise``
    (gpu_connector=vllm_layerwise) layer i is loaded in ``wait_for_layer_load`` and copied out in
    ``save_kv_layer``, and ``wait_for_save`` completes both (``layerwise_worker.py``).
    """

    _cache_hit_source = CacheHitSource.EXTERNAL_UNSPECIFIED

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._impl = LMCacheConnectorV1Impl(vllm_config, role == KVConnectorRole.SCHEDULER, self)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """True with a layerwise gpu_connector: its per-layer hooks must run outside CUDA graphs."""
        from lmcache.integration.vllm.connector_impl import wants_layerwise

        return wants_layerwise(extra_config)

    # worker side
    def register_kv_caches(self, kv_caches: dict) -> None:
        self._impl.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._impl.begin_step()

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self._impl.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._impl.wait_for_layer_load(layer_name)  # non-layerwise: loads finish in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        self._impl.save_kv_layer(layer_name)  # non-layerwise: saves run in wait_for_save

    def wait_for_save(self) -> None:
        self._impl.wait_for_save()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._impl.get_block_ids_with_load_errors()

    def shutdown(self) -> None:
        self._impl.shutdown()

    # metrics: lmcache's counters/timers on vLLM's /metrics (lmcache.observability.vllm_metrics)
    def get_kv_connector_stats(self):
        """Worker side: lmcache's stats since the last step (None on the scheduler side, before
        the engine exists, or when nothing happened)."""
        worker = getattr(self._impl, "worker", None)
        engine = getattr(worker, "engine", None)
        if engine is None:
            return None
        if getattr(self, "_stats_source", None) is None or self._stats_source.monitor is not engine.stats:
            from lmcache.observability.vllm_metrics import ConnectorStatsSource

            self._stats_source = ConnectorStatsSource(engine.stats)
        return self._stats_source.collect()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        from lmcache.observability.vllm_metrics import LMCacheKVConnectorStats

        return LMCacheKVConnectorStats.from_data(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from lmcache.observability.vllm_metrics import LMCachePromMetrics

        return LMCachePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._impl.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._impl.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        return self._impl.build_connector_meta(scheduler_output)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        return self._impl.request_finished(request, block_ids)
