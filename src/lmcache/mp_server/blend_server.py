"""BlendServer: the CacheBlend variant of the MP server (LMCache's MP ``blend`` module).

Serves three requests of :mod:`lmcache.v1.multiprocess.protocol` on top of
:class:`lmcache.mp_server.server.MPServer` (``python -m lmcache.mp_server blend=cacheblend``):

- CB_STORE: the prompt's tokens are split at the separator tokens of ``blend_special_str``
  (:class:`lmcache.token_database.segment.SegmentTokenDatabase`, LMCache's segment hash); each
  segment's KV is copied out of the instance's registered paged KV and kept under its own hash
  (independent of where it sat), with the positions it was computed at.
- CB_LOOKUP: the new prompt's segments are hashed the same way; every cached one is reported,
  wherever it sits, as ``[start, end, stored_start]`` (token ranges of the new prompt), pinned
  for the request until its CB_RETRIEVE or END_SESSION.
- CB_RETRIEVE: the asked ranges' KV is written into the instance's paged KV at the new
  prompt's slots, K rotated by RoPE from the stored to the new positions
  (:class:`lmcache.blend.rotary.FusedRotaryEmb`); slots outside the ranges are untouched.
  Which tokens are then recomputed stays with the engine (the server has no model), as in
  LMCache.

Segments live in this process's memory (``capacity_bytes``; least recently used unpinned
segments are evicted first). A failed copy is a miss, never wrong KV.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from lmcache.blend.rotary import FusedRotaryEmb
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv
from lmcache.token_database.segment import DEFAULT_BLEND_SPECIAL_STR, SegmentTokenDatabase
from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey

logger = logging.getLogger(__name__)


@dataclass
class _Segment:
    kv: torch.Tensor          # [2, L, T, H*D] CPU, K as computed at ``positions``
    positions: torch.Tensor   # int64 [T]
    layout_kind: str
    nbytes: int


class BlendServer:
    """Segment store + CB lookup/retrieve for the MP server (module docstring).

    Args:
        blend_special_str: separator text (used with the model's tokenizer when
            ``separator_tokens`` is None).
        separator_tokens: the separator's token ids (LMCache's ``blend_special_str`` tokens).
        hash_algorithm, hash_seed: as SegmentTokenDatabase (LMCache's segment hash).
        capacity_bytes: bytes of segment KV kept (> 0).
        tokenizer_factory: ``model_name -> (str -> token ids)`` for models without
            ``separator_tokens`` (default: ``transformers.AutoTokenizer``).

    Raises:
        ValueError: a non-positive capacity or bad separator / hash options (named).
    """

    def __init__(self, blend_special_str: str = DEFAULT_BLEND_SPECIAL_STR,
                 separator_tokens: Optional[Sequence[int]] = None,
                 hash_algorithm: str = "sha256_cbor", hash_seed: Optional[str] = None,
                 capacity_bytes: int = 1 << 30,
                 tokenizer_factory: Optional[Callable[[str], Callable]] = None) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"BlendServer capacity_bytes must be a positive int, "
                             f"got {capacity_bytes!r}")
        self._db_args = dict(blend_special_str=blend_special_str,
                             separator_tokens=None if separator_tokens is None
                             else list(separator_tokens),
                             hash_algorithm=hash_algorithm, hash_seed=hash_seed)
        if separator_tokens is not None:  # checked now, not at the first request
            SegmentTokenDatabase(**self._db_args)
        self._tokenizer_factory = tokenizer_factory or _auto_tokenizer
        self.capacity_bytes = capacity_bytes
        self._dbs: dict[str, SegmentTokenDatabase] = {}
        self._segments: OrderedDict[tuple, _Segment] = OrderedDict()
        self._pins: dict[str, dict[tuple, int]] = {}
        self._ropes: dict[tuple, FusedRotaryEmb] = {}
        self._bytes = 0
        self._lock = threading.Lock()  # lookups run on the loop thread, copies on the transfer one
        self.counters = {"stored_segments": 0, "hit_segments": 0, "missed_segments": 0,
                         "retrieved_segments": 0, "evicted_segments": 0}

    # ---- segments ------------------------------------------------------------------------
    def segments(self, key: IPCCacheEngineKey, tokens: list[int]) -> list[tuple[int, int, tuple]]:
        """``[(start, end, store_key)]`` of the non-empty segments of ``tokens``."""
        db = self._db(key.model_name)
        ids = (key.model_name, key.world_size, key.worker_id or 0, key.cache_salt or "")
        return [(s, e, ids + (h,)) for s, e, h in
                db.process_tokens(tokens, make_key=False, request_configs=key.request_configs())]

    def store(self, key: IPCCacheEngineKey, slots: torch.Tensor, kv_caches: list, layout) -> int:
        """Copy every not-yet-cached segment of ``key``'s tokens out of ``kv_caches``.

        Args:
            key: token-mode key; its ``[start, end)`` range is what ``slots`` covers.
            slots: int64 ``[end - start]`` paged slots of those tokens (CPU).
            kv_caches: the instance's per-layer paged tensors; layout: their KVCacheLayout.

        Returns:
            segments newly stored. Raises ValueError for an MLA layout (no per-head K).
        """
        if layout.kind == "mla":
            raise ValueError("CB_STORE: MLA KV (kind 'mla') has no per-head K to re-position")
        start, end = key.token_range()
        tokens = list(key.token_ids[:end])
        new = 0
        for s, e, skey in self.segments(key, tokens):
            if s < start:
                continue  # not in the range the engine gave slots for
            with self._lock:
                if skey in self._segments:
                    self._segments.move_to_end(skey)
                    continue
            kv = gather_kv(kv_caches, slots[s - start:e - start].to(kv_caches[0].device),
                           layout).to("cpu")
            seg = _Segment(kv, torch.arange(s, e, dtype=torch.int64), layout.kind,
                           kv.numel() * kv.element_size())
            with self._lock:
                self._segments[skey] = seg
                self._bytes += seg.nbytes
                self._evict()
            new += 1
        self.counters["stored_segments"] += new
        return new

    def lookup(self, key: IPCCacheEngineKey) -> list[list[int]]:
        """``[[start, end, stored_start], ...]`` of the cached segments of ``key``'s tokens,
        in prompt order; pinned under ``key.request_id`` (when given) until :meth:`unpin`."""
        start, end = key.token_range()
        tokens = list(key.token_ids[:end])
        out = []
        with self._lock:
            for s, e, skey in self.segments(key, tokens):
                seg = self._segments.get(skey)
                if seg is None or s < start:
                    self.counters["missed_segments"] += 1
                    continue
                self._segments.move_to_end(skey)
                self.counters["hit_segments"] += 1
                out.append([s, e, int(seg.positions[0])])
                if key.request_id is not None:
                    pins = self._pins.setdefault(key.request_id, {})
                    pins[skey] = pins.get(skey, 0) + 1
        return out

    def retrieve(self, key: IPCCacheEngineKey, ranges: list, slots: torch.Tensor,
                 kv_caches: list, layout, rope: dict) -> list[bool]:
        """Write the cached segments at ``ranges`` into ``kv_caches``, K re-positioned.

        Args:
            key: token-mode key of the new prompt; ``slots`` covers its ``[start, end)``.
            ranges: ``[[start, end], ...]`` token ranges of the new prompt (from CB_LOOKUP),
                each exactly one segment.
            slots: int64 ``[end - start]`` paged slots (CPU).
            kv_caches, layout: the instance's paged KV and its KVCacheLayout.
            rope: ``{"rope_parameters": {...}, "is_neox_style": bool}`` (vLLM's
                ``get_rope`` arguments; see FusedRotaryEmb.from_rope_parameters).

        Returns:
            one bool per range: loaded (True) or a miss (False: not cached, not one segment,
            outside the key's range, or a different layout). Releases ``key.request_id``'s pins.

        Raises:
            ValueError: bad ``ranges`` / ``rope`` (named), an MLA layout.
        """
        if layout.kind == "mla":
            raise ValueError("CB_RETRIEVE: MLA KV (kind 'mla') has no per-head K to re-position")
        emb = self._rope(layout.head_size, rope)
        start, end = key.token_range()
        tokens = list(key.token_ids[:end])
        by_range = {(s, e): skey for s, e, skey in self.segments(key, tokens)}
        results = []
        try:
            for r in _check_ranges(ranges):
                skey = by_range.get(r)
                with self._lock:
                    seg = self._segments.get(skey) if skey is not None else None
                if seg is None or r[0] < start or seg.layout_kind != layout.kind:
                    results.append(False)
                    continue
                s, e = r
                kv = seg.kv.to(kv_caches[0].device, copy=True)
                new_pos = torch.arange(s, e, dtype=torch.int64)
                if not torch.equal(new_pos, seg.positions):
                    cos, sin = emb.rotation(seg.positions, new_pos, kv.device)
                    # every layer's heads share a token's rotation: one call on [T, L*H*D]
                    k = kv[0].transpose(0, 1).contiguous()
                    emb.rotate(k.view(e - s, -1), cos, sin)
                    kv[0].copy_(k.transpose(0, 1))
                scatter_kv(kv_caches, slots[s - start:e - start].to(kv.device), layout, kv)
                results.append(True)
            self.counters["retrieved_segments"] += sum(results)
        finally:
            if key.request_id is not None:
                self.unpin(key.request_id)
        return results

    def unpin(self, request_id: str) -> None:
        """Release every pin of ``request_id`` (no-op when it holds none)."""
        with self._lock:
            self._pins.pop(request_id, None)
            self._evict()

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counters, segments=len(self._segments), bytes=self._bytes,
                        pinned_requests=len(self._pins))

    # ---- internals -----------------------------------------------------------------------
    def _evict(self) -> None:
        if self._bytes <= self.capacity_bytes:
            return
        pinned = {k for pins in self._pins.values() for k in pins}
        for skey in list(self._segments):
            if self._bytes <= self.capacity_bytes:
                return
            if skey in pinned:
                continue
            self._bytes -= self._segments.pop(skey).nbytes
            self.counters["evicted_segments"] += 1

    def _db(self, model_name: str) -> SegmentTokenDatabase:
        db = self._dbs.get(model_name)
        if db is None:
            tok = None if self._db_args["separator_tokens"] is not None \
                else self._tokenizer_factory(model_name)
            db = self._dbs[model_name] = SegmentTokenDatabase(tokenizer=tok, **self._db_args)
        return db

    def _rope(self, head_size: int, rope: Any) -> FusedRotaryEmb:
        if not isinstance(rope, dict) or not isinstance(rope.get("rope_parameters", {}), dict):
            raise ValueError(f"CB_RETRIEVE rope must be a dict {{'rope_parameters': {{...}}, "
                             f"'is_neox_style': bool}}, got {rope!r}")
        params = rope.get("rope_parameters") or {}
        neox = bool(rope.get("is_neox_style", True))
        cache_key = (head_size, neox, tuple(sorted((k, repr(v)) for k, v in params.items())))
        emb = self._ropes.get(cache_key)
        if emb is None:
            emb = self._ropes[cache_key] = FusedRotaryEmb.from_rope_parameters(
                head_size, params, neox)
        return emb


def _check_ranges(ranges: Any) -> list[tuple[int, int]]:
    ok = isinstance(ranges, (list, tuple))
    out = []
    for r in ranges if ok else ():
        if (not isinstance(r, (list, tuple)) or len(r) < 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r[:2])
                or not 0 <= r[0] < r[1]):
            ok = False
            break
        out.append((int(r[0]), int(r[1])))
    if not ok:
        raise ValueError(f"CB_RETRIEVE ranges must be a list of [start, end] with "
                         f"0 <= start < end, got {ranges!r}")
    return out


def _auto_tokenizer(model_name: str) -> Callable:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_name)
    return lambda text: tok.encode(text, add_special_tokens=False)
