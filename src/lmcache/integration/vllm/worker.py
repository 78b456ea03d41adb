"""LMCacheWorker side of the vLLM integration: runs the loads and saves a step's metadata asks for."""

from __future__ import annotations

import logging

import torch

from lmcache.integration.vllm.specs import LMCacheConnectorMetadata, ReqMeta

logger = logging.getLogger(__name__)

# Tiers private to one worker process (its memory, its own disk directory); the others (remote)
# are seen by every process, so MLA's passive ranks leave them to rank 0.
_PROCESS_OWN_TIERS = ("LocalCPUBackend", "LocalDiskBackend")


class ConnectorWorker:
    """Executes ReqMeta loads (before the forward pass) and saves (after it) on one worker.

    Args:
        engine: the worker's LMCacheEngine.
        kv_caches: vLLM's paged KV tensors, one per attention layer, in layer order.
        block_size: vLLM block size in tokens (slot // block_size = block id).

    MLA with ``save_only_first_rank`` (the token database's, on by default for MLA as in
    LMCache): every rank holds the same KV under the same keys, so only rank 0 writes the tiers
    other processes see (remote); another rank stores only into its own tiers (CPU, local disk:
    one ``store_location`` each) and reads what rank 0 wrote. A TP=2 instance thus writes each
    chunk once to the remote store, and a TP=1 instance reuses it.
    """

    def __init__(self, engine, kv_caches: list[torch.Tensor], block_size: int):
        self.engine = engine
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.passive = bool(getattr(engine.token_database, "save_only_first_rank", False)) and \
            engine.metadata.worker_id != 0
        names = list(engine.storage_manager.tier_names)
        own = [n for n in names if n in _PROCESS_OWN_TIERS]
        # store_location per store call: None = every tier; passive ranks only their own tiers
        self.store_locations: list[str | None] = [None]
        if self.passive and own != names:
            self.store_locations = list(own)
        self._invalid_block_ids: set[int] = set()
        self.loaded_tokens = 0
        self.failed_loads = 0
        self.failed_saves = 0

    def load(self, meta: LMCacheConnectorMetadata) -> None:
        """Retrieve every request's needed tokens into the paged cache, then release lookup pins.

        Tokens that lmcache could not deliver are reported through
        :meth:`take_invalid_block_ids`, so vLLM recomputes them instead of reading garbage.
        """
        for req in meta.requests:
            if req.load_spec is not None:
                self._load_one(req)
        self.release_pins(meta.unpin_ids)

    def release_pins(self, lookup_ids: list[str]) -> None:
        """Release the lookup pins of ``lookup_ids`` (errors are logged, never raised)."""
        for lookup_id in lookup_ids:
            try:
                self.engine.lookup_unpin(lookup_id)
            except Exception:  # releasing pins must never fail a step
                logger.exception("lookup_unpin(%s) failed", lookup_id)

    def _load_one(self, req: ReqMeta) -> None:
        tokens, token_mask, slots = self.load_args(req)
        try:
            # lookup_id: the chunks this request's lookup pinned or prefetched are taken from there
            # (and released at the end), so a slower tier is not read twice.
            ret_mask = self.engine.retrieve(tokens, token_mask, kvcaches=self.kv_caches, slot_mapping=slots,
                                            request_configs=req.request_configs, lookup_id=req.req_id)
        except Exception:
            logger.exception("retrieve for request %s failed; vLLM will recompute", req.req_id)
            ret_mask = None
        self.record_load(req, ret_mask)

    @staticmethod
    def load_args(req: ReqMeta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, token_mask, slot_mapping) of a request's retrieve: whole chunks
        [load_skip_tokens, load_fetch_end) are fetched, only [load_from, load_end) is written."""
        end = req.load_fetch_end
        tokens = req.token_ids[:end]
        token_mask = torch.ones(end, dtype=torch.bool)
        token_mask[: req.load_skip_tokens] = False
        slots = req.slot_mapping[:end].clone()
        slots[: req.load_from] = -1  # vLLM already holds these: never overwrite its blocks
        slots[req.load_end:] = -1  # beyond what vLLM takes from lmcache
        return tokens, token_mask, slots

    def record_load(self, req: ReqMeta, ret_mask: torch.Tensor | None) -> None:
        """Count a request's load; the blocks of tokens it did not deliver (all of them when
        ``ret_mask`` is None: the load failed) become invalid block ids."""
        if ret_mask is None:
            ok = torch.zeros(req.load_end - req.load_from, dtype=torch.bool)
        else:
            ok = ret_mask[req.load_from: req.load_end]
        self.loaded_tokens += int(ok.sum())
        if not bool(ok.all()):
            self.failed_loads += 1
            missing = req.slot_mapping[req.load_from: req.load_end][~ok]
            self._invalid_block_ids.update(int(b) for b in torch.unique(missing // self.block_size))

    def save(self, meta: LMCacheConnectorMetadata) -> None:
        """Store every request's new chunks (after the forward pass wrote their KV)."""
        for req in meta.requests:
            args = self.save_args(req)
            if args is None:
                continue
            tokens, store_mask, slots = args
            for location in self.store_locations:
                where = {} if location is None else {"store_location": location}
                try:
                    self.engine.store(tokens, store_mask, kvcaches=self.kv_caches, slot_mapping=slots,
                                      request_configs=req.request_configs, req_id=req.req_id,
                                      **where)
                except Exception:  # a failed store costs future hits, never the request
                    self.failed_saves += 1
                    logger.exception("store for request %s failed", req.req_id)

    @staticmethod
    def save_args(req: ReqMeta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(tokens, store_mask, slot_mapping) of a request's store in this step, or None when it
        stores nothing; the store_mask is False over ``save_spec.skip_leading_tokens``."""
        spec = req.save_spec
        if spec is None or not spec.can_save:
            return None
        end = req.save_end
        store_mask = torch.ones(end, dtype=torch.bool)
        store_mask[: spec.skip_leading_tokens] = False
        return req.token_ids[:end], store_mask, req.slot_mapping[:end]

    def take_invalid_block_ids(self) -> set[int]:
        """Block ids whose load failed since the last call (then forgotten)."""
        out, self._invalid_block_ids = self._invalid_block_ids, set()
        return out
