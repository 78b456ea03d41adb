"""The module vLLM's built-in ``LMCacheConnectorV1`` imports: ``kv_connector="LMCacheConnectorV1"``
(no module path) runs lmcache.

vLLM 0.32's ``vllm/distributed/kv_transfer/kv_connector/v1/lmcache_connector.py`` does
``from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl`` and builds it as
``LMCacheConnectorV1Impl(vllm_config, role, parent_connector)``. This module adapts lmcache's
connector body (:mod:`lmcache.integration.vllm.connector_impl`) to the calls that connector makes;
it holds no logic of its own. The calls, with what each returns:

* scheduler: ``get_num_new_matched_tokens(request, num_computed_tokens) -> int`` (the connector
  adds ``load_async=False``), ``update_state_after_alloc(request, num_external_tokens)`` (no
  blocks argument), ``build_connector_meta(scheduler_output)``, ``request_finished(request,
  block_ids) -> (bool, dict | None)``;
* worker: ``register_kv_caches(kv_caches)``, ``bind_connector_metadata(metadata)``,
  ``start_load_kv(forward_context, **kw)``, ``wait_for_layer_load(layer_name)``,
  ``save_kv_layer(layer_name, kv_layer, attn_metadata, **kw)``, ``wait_for_save()``,
  ``get_finished(finished_req_ids) -> (None, None)`` (saves are synchronous),
  ``get_block_ids_with_load_errors() -> set[int]``, ``get_kv_events() -> []`` (lmcache publishes
  no KV events).

The stock connector never calls ``shutdown`` on its engine; lmcache's worker flushes and closes
at interpreter exit (``atexit``), as with LMCacheConnectorV1Dynamic.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from lmcache.integration.vllm import connector_impl


class LMCacheConnectorV1Impl(connector_impl.LMCacheConnectorV1Impl):
    """lmcache's connector body with the signatures of vLLM's built-in ``LMCacheConnectorV1``.

    Args:
        vllm_config: vLLM's VllmConfig (``kv_transfer_config`` must be set).
        role: ``KVConnectorRole.SCHEDULER`` or ``KVConnectorRole.WORKER``.
        parent: the owning vLLM connector (source of the bound connector metadata).
    Raises:
        ValueError: a bad lmcache configuration or kv_role (as the body raises it).
    """

    def __init__(self, vllm_config, role: KVConnectorRole, parent) -> None:
        super().__init__(vllm_config, role == KVConnectorRole.SCHEDULER, parent)

    # scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:  # type: ignore[override]
        """Tokens vLLM may take from lmcache beyond ``num_computed_tokens`` (loads are synchronous)."""
        need, _ = super().get_num_new_matched_tokens(request, num_computed_tokens)
        return need

    def update_state_after_alloc(self, request, num_external_tokens: int) -> None:  # type: ignore[override]
        """vLLM allocated the request's blocks (the stock connector passes no blocks)."""
        super().update_state_after_alloc(request, None, num_external_tokens)

    # worker side
    def bind_connector_metadata(self, connector_metadata) -> None:
        """A new step's metadata was bound to the parent connector (resets layerwise state)."""
        self.begin_step()

    def save_kv_layer(self, layer_name: str, kv_layer: Any = None,  # type: ignore[override]
                      attn_metadata: Any = None, **kwargs: Any) -> None:
        """Layerwise: copy layer ``layer_name`` out (no-op otherwise; saves run in wait_for_save)."""
        super().save_kv_layer(layer_name)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """No asynchronous sends or receives: ``(None, None)``."""
        return None, None

    def get_kv_events(self) -> list:
        """lmcache publishes no KV cache events: ``[]``."""
        return []
