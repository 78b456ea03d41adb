"""ConnectorPlanner: the scheduler arithmetic of the vLLM integration, free of vLLM objects.

Rules (LMCache's vLLM adapter semantics, DESIGN §4.7):
- need = hit − vllm_computed, minus 1 when the whole prompt hits (vLLM recomputes the last
  token to get logits); never negative.
- A load fetches whole chunks from floor(vllm_cached / chunk)·chunk and writes only the tokens vLLM
  takes: [vllm_cached, vllm_cached + num_external_tokens).
- A non-final prefill step saves whole chunks only; the final prefill step saves the prompt
  (its trailing partial chunk is kept only when the token database saves unfull chunks).
- Decode tokens are saved (whole chunks) only with save_decode_cache.
- kv_producer never loads and saves everything (skip_leading_tokens = 0); kv_consumer never saves.
"""

from __future__ import annotations

import torch

from lmcache.integration.vllm.request_tracker import RequestTracker
from lmcache.integration.vllm.specs import LoadSpec, ReqMeta, SaveSpec

KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")


def _floor(n: int, c: int) -> int:
    return n // c * c


class ConnectorPlanner:
    """Turns vLLM scheduler events into per-request load/save work (ReqMeta).

    Args:
        chunk_size: lmcache chunk size in tokens (> 0).
        block_size: vLLM block size in tokens (> 0).
        kv_role: ``kv_both``, ``kv_producer`` or ``kv_consumer``.
        save_decode_cache: also store KV of generated tokens.
    Raises:
        ValueError: a non-positive size or an unknown kv_role (the message names the value).
    """

    def __init__(self, chunk_size: int, block_size: int, kv_role: str = "kv_both",
                 save_decode_cache: bool = False):
        if chunk_size <= 0 or block_size <= 0:
            raise ValueError(f"chunk_size ({chunk_size}) and block_size ({block_size}) must be > 0")
        if kv_role not in KV_ROLES:
            raise ValueError(f"kv_role {kv_role!r} is not one of {KV_ROLES}")
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.kv_role = kv_role
        self.save_decode_cache = save_decode_cache
        self._load_specs: dict[str, LoadSpec] = {}
        self._trackers: dict[str, RequestTracker] = {}

    # -- lookup / allocation -------------------------------------------------------------------
    def on_lookup(self, req_id: str, num_tokens: int, num_computed_tokens: int, hit: int) -> int:
        """Record a lookup answer; return the tokens vLLM may take from lmcache (``need``)."""
        usable = hit - 1 if hit >= num_tokens else hit
        self._load_specs[req_id] = LoadSpec(vllm_cached_tokens=num_computed_tokens, lmcache_cached_tokens=hit)
        return max(usable - num_computed_tokens, 0)

    def on_alloc(self, req_id: str, num_external_tokens: int) -> None:
        """vLLM allocated blocks; ``num_external_tokens`` > 0 means it will take them from lmcache."""
        spec = self._load_specs.get(req_id)
        if spec is not None and num_external_tokens > 0:
            spec.can_load = True
            spec.num_external_tokens = num_external_tokens

    # -- per step ------------------------------------------------------------------------------
    def plan_new(self, req_id: str, tokens: list[int], prompt_len: int, block_ids: list[int],
                 num_computed_tokens: int, num_scheduled_tokens: int,
                 request_configs: dict | None = None) -> tuple[ReqMeta | None, bool]:
        """Plan a request scheduled for the first time (or resumed after preemption).

        Returns (ReqMeta or None, whether the worker must release this request's lookup pins).
        """
        tracker = RequestTracker(req_id, prompt_len, list(block_ids), 0, request_configs)
        self._trackers[req_id] = tracker
        spec = self._load_specs.pop(req_id, None)
        if spec is not None and self.kv_role != "kv_producer":
            # What lmcache already holds need not be stored again (a partial last chunk is
            # only ever present when the prompt ends there).
            tracker.num_saved_tokens = min(spec.lmcache_cached_tokens, prompt_len)
        return self._plan(tracker, tokens, num_computed_tokens, num_scheduled_tokens, spec), spec is not None

    def plan_cached(self, req_id: str, tokens: list[int], new_block_ids: list[int] | None, resumed: bool,
                    num_computed_tokens: int, num_scheduled_tokens: int) -> ReqMeta | None:
        """Plan a request that was scheduled before (chunked prefill, decode, resumption)."""
        tracker = self._trackers.get(req_id)
        if tracker is None:
            return None
        tracker.update_blocks(new_block_ids, replace=resumed)
        spec = self._load_specs.pop(req_id, None)
        return self._plan(tracker, tokens, num_computed_tokens, num_scheduled_tokens, spec)

    def finish(self, req_id: str) -> None:
        """Forget a finished request."""
        self._trackers.pop(req_id, None)
        self._load_specs.pop(req_id, None)

    def _plan(self, tracker: RequestTracker, tokens: list[int], num_computed: int, num_scheduled: int,
              spec: LoadSpec | None) -> ReqMeta | None:
        c = self.chunk_size
        meta = ReqMeta(req_id=tracker.req_id, token_ids=torch.empty(0), slot_mapping=torch.empty(0),
                       request_configs=tracker.request_configs)
        n = 0
        if spec is not None and spec.can_load and self.kv_role != "kv_producer":
            ext = spec.num_external_tokens
            local = num_computed - ext
            meta.load_spec = spec
            meta.load_from, meta.load_end = local, local + ext
            meta.load_skip_tokens = _floor(local, c)
            meta.load_fetch_end = max(min(spec.lmcache_cached_tokens, -(-meta.load_end // c) * c), meta.load_end)
            n = meta.load_fetch_end
        save_end = self._save_end(tracker, num_computed + num_scheduled)
        if save_end is not None:
            skip = 0 if self.kv_role == "kv_producer" else _floor(tracker.num_saved_tokens, c)
            meta.save_spec = SaveSpec(skip_leading_tokens=skip, can_save=True)
            meta.save_end = save_end
            tracker.num_saved_tokens = save_end
            n = max(n, save_end)
        if n == 0:
            return None
        meta.token_ids = torch.tensor(tokens[:n], dtype=torch.int64)
        if meta.token_ids.numel() != n:
            raise ValueError(f"request {tracker.req_id}: needs {n} tokens, only {len(tokens)} known")
        slots = torch.full((n,), -1, dtype=torch.int64)
        covered = min(n, len(tracker.block_ids) * self.block_size)
        slots[:covered] = tracker.slot_mapping(covered, self.block_size)
        meta.slot_mapping = slots
        return meta

    def _save_end(self, tracker: RequestTracker, total: int) -> int | None:
        """End of the prefix to store after this step, or None when nothing is stored."""
        if self.kv_role == "kv_consumer":
            return None
        c = self.chunk_size
        if total < tracker.prompt_len:
            end = _floor(total, c)  # non-final prefill: whole chunks only
        elif tracker.num_saved_tokens < tracker.prompt_len:
            end = tracker.prompt_len  # final prefill step
            if self.save_decode_cache:
                end = max(end, _floor(total, c))
        elif self.save_decode_cache:
            end = _floor(total, c)
        else:
            return None
        return end if end > tracker.num_saved_tokens else None
