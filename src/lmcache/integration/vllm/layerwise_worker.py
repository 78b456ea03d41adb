"""LayerwiseConnectorWorker: the vLLM worker side with ``use_layerwise`` (gpu_connector=vllm_layerwise).

vLLM 0.32 calls the connector around every attention layer (``maybe_transfer_kv_layer`` in
``vllm/model_executor/layers/attention/kv_transfer_utils.py``): ``wait_for_layer_load(name)``
before the layer's attention, ``save_kv_layer(name, ...)`` after it (the layer's new KV is already
in the paged cache). On the CPU platform attention is an opaque custom op whose body carries that
decorator, so the hooks run there too, in eager and compiled mode. Per step:

* ``begin_step``  (bind_connector_metadata) a new step starts.
* ``load``        (start_load_kv, before the forward pass when the step has loads) a
  ``retrieve_layer`` generator per request with a LoadSpec; its first step finds and gets the
  chunks; then the lookup pins are released (the generator holds the objects).
* ``wait_for_layer(name)`` loads layer i of every request; the compute stream waits for it.
* ``save_layer(name, meta)`` on the step's first call starts a ``store_layer`` generator per
  request with a SaveSpec (allocating every (chunk, layer) object); copies layer i out.
* ``save``        (wait_for_save) finishes: every load's last step (its ret_mask; undelivered
  tokens become invalid blocks), every store's remaining layers and its final step (the put).

A layer that was not loaded before its attention ran (its hook never came, or start_load_kv came
after the forward pass) is never trusted: the request's load counts as failed and its blocks are
reported, so vLLM recomputes them (``kv_load_failure_policy="recompute"``). A store whose hooks
never came is still complete: wait_for_save copies its remaining layers while the KV is in place.
"""

from __future__ import annotations

import logging
from collections.abc import Generator

import torch

from lmcache.integration.vllm.specs import LMCacheConnectorMetadata, ReqMeta
from lmcache.integration.vllm.worker import ConnectorWorker

logger = logging.getLogger(__name__)


class _Job:
    """One request's store_layer / retrieve_layer generator and its next layer."""

    __slots__ = ("req", "gen", "next_layer")

    def __init__(self, req: ReqMeta, gen: Generator) -> None:
        self.req, self.gen, self.next_layer = req, gen, 0


class LayerwiseConnectorWorker(ConnectorWorker):
    """ConnectorWorker that loads and saves one layer at a time (see the module docstring).

    Args:
        engine: the worker's LMCacheEngine, with a layerwise gpu_connector.
        kv_caches: vLLM's paged KV tensors, one per attention layer, in layer order.
        block_size: vLLM block size in tokens.
        layer_names: vLLM's layer names, in the order of ``kv_caches``.
    Raises:
        ValueError: ``layer_names`` and ``kv_caches`` differ in length or names repeat.
        TypeError: the engine has no layerwise gpu_connector.

    Attributes:
        late_loads: loads dropped because a layer would have arrived after its attention.
    """

    def __init__(self, engine, kv_caches: list[torch.Tensor], block_size: int,
                 layer_names: list[str]):
        if not getattr(engine, "is_layerwise", False):
            raise TypeError("LayerwiseConnectorWorker needs an LMCacheEngine with a layerwise "
                            f"gpu_connector, got {type(getattr(engine, 'gpu_connector', None)).__name__}")
        if len(layer_names) != len(kv_caches) or len(set(layer_names)) != len(layer_names):
            raise ValueError(f"need one distinct layer name per KV cache tensor ({len(kv_caches)}), "
                             f"got {list(layer_names)!r}")
        super().__init__(engine, kv_caches, block_size)
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        self.num_layers = len(kv_caches)
        self.late_loads = 0
        self._loads: list[_Job] = []
        self._stores: list[_Job] | None = None  # None until the step's stores are started
        self._forward_seen = False

    # ---- step protocol ---------------------------------------------------------------------
    def begin_step(self) -> None:
        """A new step: finish anything a previous step left open (none when vLLM called
        wait_for_save), then forget that a forward pass was seen."""
        if self._loads or self._stores is not None:
            self._finish()
        self._forward_seen = False

    def load(self, meta: LMCacheConnectorMetadata) -> None:
        """Start every request's retrieve_layer and take its first step (lookup + get)."""
        for req in meta.requests:
            if req.load_spec is None:
                continue
            if self._forward_seen:  # the layers' attention already ran in this step
                self._count_late(req, "start_load_kv came after the forward pass")
                continue
            tokens, token_mask, slots = self.load_args(req)
            try:
                gen = self.engine.retrieve_layer(tokens, token_mask, kvcaches=self.kv_caches,
                                                 slot_mapping=slots, request_configs=req.request_configs)
                next(gen)
            except Exception:
                logger.exception("retrieve for request %s failed; vLLM will recompute", req.req_id)
                self.record_load(req, None)
                continue
            self._loads.append(_Job(req, gen))
        self.release_pins(meta.unpin_ids)

    def wait_for_layer(self, layer_name: str) -> None:
        """Before layer ``layer_name``'s attention: load that layer of every request."""
        self._forward_seen = True
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        for job in list(self._loads):
            if job.next_layer < layer:  # an earlier layer's attention ran without its KV
                self._drop_load(job, f"no wait_for_layer_load for layer {job.next_layer}")
            elif job.next_layer == layer:
                ok, transfer = self._step(job, self._loads)
                if ok and transfer is not None:
                    transfer.wait_on()  # the compute stream waits; the host does not

    def save_layer(self, layer_name: str, meta: LMCacheConnectorMetadata) -> None:
        """After layer ``layer_name``'s attention: copy that layer (and any skipped earlier one,
        whose KV is still in place) of every request that saves in this step."""
        self._forward_seen = True
        if self._stores is None:
            self._stores = self._start_stores(meta)
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        for job in list(self._stores):
            while job.next_layer <= layer and self._step(job, self._stores)[0]:
                pass

    def save(self, meta: LMCacheConnectorMetadata) -> None:
        """wait_for_save: finish every load and store of the step (stores not started by a
        save_kv_layer hook are started and run whole here)."""
        if self._stores is None:
            self._stores = self._start_stores(meta)
        self._finish()
        self._forward_seen = False

    # ---- implementation ----------------------------------------------------------------------
    def _start_stores(self, meta: LMCacheConnectorMetadata) -> list[_Job]:
        jobs = []
        for req in meta.requests:
            args = self.save_args(req)
            if args is None:
                continue
            tokens, store_mask, slots = args
            try:
                jobs.append(_Job(req, self.engine.store_layer(
                    tokens, store_mask, kvcaches=self.kv_caches, slot_mapping=slots,
                    request_configs=req.request_configs)))
            except Exception:  # a failed store costs future hits, never the request
                self.failed_saves += 1
                logger.exception("store for request %s failed", req.req_id)
        return jobs

    def _step(self, job: _Job, jobs: list[_Job]) -> tuple[bool, object]:
        """One ``next()`` of a job; on error the job is dropped and counted."""
        try:
            value = next(job.gen)
        except Exception:
            jobs.remove(job)
            if jobs is self._loads:
                logger.exception("layerwise retrieve for request %s failed; vLLM will recompute",
                                 job.req.req_id)
                self.record_load(job.req, None)
            else:
                logger.exception("layerwise store for request %s failed", job.req.req_id)
                self.failed_saves += 1
            return False, None
        job.next_layer += 1
        return True, value

    def _finish(self) -> None:
        for job in list(self._loads):
            if job.next_layer < self.num_layers:
                self._drop_load(job, f"no wait_for_layer_load for layer {job.next_layer}")
                continue
            ok, ret_mask = self._step(job, self._loads)  # waits for the loads, checks slots
            if ok:
                self._loads.remove(job)
                self.record_load(job.req, ret_mask)
        for job in list(self._stores or ()):
            while job.next_layer <= self.num_layers and self._step(job, self._stores)[0]:
                pass  # remaining layers, then the final step (the put)
            if job in self._stores:
                self._stores.remove(job)
            job.gen.close()
        self._stores = None

    def _drop_load(self, job: _Job, why: str) -> None:
        self._loads.remove(job)
        job.gen.close()  # waits for its copies in flight, releases its objects
        self._count_late(job.req, why)

    def _count_late(self, req: ReqMeta, why: str) -> None:
        self.late_loads += 1
        if self.late_loads == 1:
            logger.warning("layerwise load of request %s dropped (%s): vLLM recomputes it; later "
                           "drops are counted in late_loads", req.req_id, why)
        self.record_load(req, None)
