"""BlendRetriever: LMCacheEngine's CacheBlend data path (issue 9; LMCache's blending paths).

With a blend gpu_connector (``gpu_connector=vllm_buffer_layerwise``) and
``token_database=segment`` the engine stores and finds *segments* (documents between
separator tokens), each independently of where it sits in a prompt:

* ``store(tokens, kvcaches=, slot_mapping=)``: every segment not yet cached is copied out of
  the paged cache (all layers) into one BlendChunkFormat object that records the position of
  its first token (= its token index: vLLM computes prompt token i at position i), and put
  into every tier on its own (no prefix chain between segments).
* ``blend_lookup(tokens) -> mask``: CPU bool ``[N]``, True for the tokens of every segment some
  tier holds (the number of blendable tokens is ``mask.sum()``), for the scheduler side.
* ``retrieve_layers(tokens, new_positions=None)``: generator; the first ``next()`` fetches every
  cached segment (each independently: a miss in the middle does not end anything) and yields
  the cached-token mask (CPU bool ``[N]``); then one ``next()`` per layer yields that layer's
  buffer ``[2, N, H, D]`` (kv_dtype) from
  :meth:`VLLMBufferLayerwiseGPUConnector.load_layers`: reused segments at their new range with K
  re-positioned from the stored positions to ``new_positions`` (default ``arange(N)``), every
  other token zero. Closing the generator (or its end) releases every fetched object.
* ``retrieve(tokens, mask, kvcaches=, slot_mapping=)``: pure reuse (CacheBlend at recompute
  ratio 0): each layer's buffer written into the paged cache for the cached tokens only;
  returns the ret_mask. The Blender instead recomputes some tokens before writing.

An object under a blend key that is not a BlendChunkFormat segment of this layout is a miss
(and removed from its tier), never wrong KV. Tier locations (``store_location`` /
``retrieve_locations``) are not supported on this path yet (ValueError).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Optional

import torch

from lmcache.blend.blend_chunk import BlendChunkFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.token_database.base import tokens_to_list


def is_blend_connector(gpu_connector: object) -> bool:
    """Whether ``gpu_connector`` is CacheBlend's buffer connector (it gathers segments and
    loads per-layer buffers: ``gather_segment`` and ``load_layers``)."""
    return all(callable(getattr(gpu_connector, name, None))
               for name in ("gather_segment", "load_layers", "write_layer"))


class BlendRetriever:
    """The CacheBlend store / lookup / retrieve of one LMCacheEngine (module docstring).

    Args:
        engine: the LMCacheEngine; its gpu_connector must be a blend connector
            (:func:`is_blend_connector`). Its token_database should be a SegmentTokenDatabase
            (token_database=segment): with another one (chunked) the "segments" are prefix-hashed
            chunks, which only ever hit at their own positions (correct, but no reuse at others).

    Raises:
        TypeError: another connector.  ValueError: MLA metadata.
    """

    def __init__(self, engine) -> None:
        if not is_blend_connector(engine.gpu_connector):
            raise TypeError("the CacheBlend data path needs gpu_connector=vllm_buffer_layerwise, "
                            f"got {type(engine.gpu_connector).__name__}")
        self.engine = engine
        self.format = BlendChunkFormat(engine.metadata)

    def _transfer_kwargs(self, kwargs: dict) -> dict:
        """The connector's kwargs (``kvcaches`` checked); ValueError for tier locations."""
        self.engine._check_open()
        if kwargs.get("store_location") is not None or kwargs.get("retrieve_locations") is not None:
            raise ValueError("store_location / retrieve_locations are not supported on the "
                             "CacheBlend data path (got store_location="
                             f"{kwargs.get('store_location')!r}, retrieve_locations="
                             f"{kwargs.get('retrieve_locations')!r})")
        return self.engine._transfer_kwargs(kwargs)

    def _segments(self, tokens, mask, request_configs) -> list:
        """``[(start, end, blend key)]`` of the segments selected by ``mask``."""
        eng = self.engine
        eng._check_open()
        t0 = time.perf_counter()
        segs = [(s, e, self.format.key(k)) for s, e, k in eng.token_database.process_tokens(
            tokens, mask, request_configs=request_configs)]
        eng.stats.observe("process_tokens_seconds", time.perf_counter() - t0)
        return segs

    # ---- store --------------------------------------------------------------------------
    def store(self, tokens, mask: Optional[torch.Tensor], kwargs: dict) -> int:
        """Store every segment not yet cached; returns the tokens stored (see module doc).

        Raises:
            ValueError / TypeError: bad tokens, mask, kvcaches or slots (padding in a segment).
        """
        eng, sm = self.engine, self.engine.storage_manager
        t0 = time.perf_counter()
        xfer = self._transfer_kwargs(kwargs)
        eng.stats.inc("store_requests")
        segs = self._segments(tokens, mask, kwargs.get("request_configs"))
        eng.stats.inc("store_requested_tokens", sum(e - s for s, e, _ in segs))
        stored = skipped = failed = 0
        for start, end, key in segs:
            if sm.contains_prefix([key]) == 1:
                skipped += end - start
                continue
            got = self.format.allocate(sm, end - start, start)
            if got is None:  # segments are independent: a smaller later one may still fit
                failed += end - start
                continue
            obj, kv = got
            try:
                eng.gpu_connector.gather_segment(kv, start, end, **xfer)
            except BaseException:
                obj.ref_count_down()
                raise
            sm.batched_put([key], [obj])  # drops the producer's reference
            stored += end - start
        return eng._record_store(stored, skipped, failed, t0)

    # ---- lookup -------------------------------------------------------------------------
    def lookup(self, tokens, request_configs: Optional[dict] = None) -> torch.Tensor:
        """CPU bool ``[len(tokens)]``: True for the tokens of every cached segment.

        Raises:
            ValueError: bad tokens.  RuntimeError: the engine is closed.
        """
        n = len(tokens_to_list(tokens))
        mask = torch.zeros(n, dtype=torch.bool)
        sm = self.engine.storage_manager
        for start, end, key in self._segments(tokens, None, request_configs):
            if sm.contains_prefix([key]) == 1:
                mask[start:end] = True
        return mask

    # ---- retrieve -----------------------------------------------------------------------
    def retrieve_layers(self, tokens, new_positions: Optional[torch.Tensor] = None,
                        request_configs: Optional[dict] = None,
                        device=None, rotary=None) -> Generator:
        """The retrieve generator (module docstring); arguments are checked now.

        Args:
            tokens: the whole prompt (1-D int tensor or list), N tokens.
            new_positions: int ``[N]``, each token's position now; None = ``arange(N)``.
            request_configs: as for store (tags, LoRA, cache salt).
            device: buffer device (default: the connector's).
            rotary: FusedRotaryEmb re-positioning K (the Blender's model's); None = the
                connector's own.

        Raises:
            ValueError: bad tokens or positions.  RuntimeError: the engine is closed.
        """
        segs = self._segments(tokens, None, request_configs)
        n = len(tokens_to_list(tokens))
        if new_positions is None:
            new_positions = torch.arange(n)
        if not isinstance(new_positions, torch.Tensor) or tuple(new_positions.shape) != (n,) \
                or new_positions.dtype.is_floating_point or new_positions.dtype == torch.bool:
            raise ValueError(f"new_positions must be an integer tensor of shape [{n}], got "
                             f"{new_positions!r:.80}")
        if n and int(new_positions.min()) < 0:
            raise ValueError("new_positions must be >= 0")
        return self._retrieve(segs, n, new_positions, device, rotary)

    def _fetch(self, start: int, end: int, key) -> Optional[tuple[MemoryObj, int, torch.Tensor]]:
        n = end - start
        got = self.engine.storage_manager.batched_get(
            [key], accept=lambda i, obj: self.format.decode(obj, n) is not None)
        obj = got[0] if got else None
        decoded = self.format.decode(obj, n)
        if decoded is None:
            if obj is not None:
                obj.ref_count_down()
            return None
        return obj, decoded[0], decoded[1]

    def _retrieve(self, segs: list, n: int, new_positions: torch.Tensor,
                  device, rotary) -> Generator:
        eng = self.engine
        t0 = time.perf_counter()
        objs: list[MemoryObj] = []
        layers = None
        try:
            mask = torch.zeros(n, dtype=torch.bool)
            sources, starts, ends, olds = [], [], [], []
            for start, end, key in segs:
                fetched = self._fetch(start, end, key)
                if fetched is None:
                    continue
                objs.append(fetched[0])
                olds.append(fetched[1])
                sources.append(fetched[2])
                starts.append(start)
                ends.append(end)
                mask[start:end] = True
            eng.stats.inc("retrieve_requests")
            eng.stats.inc("retrieve_requested_tokens", sum(e - s for s, e, _ in segs))
            eng.stats.inc("retrieve_hit_tokens", int(mask.sum()))
            layers = eng.gpu_connector.load_layers(sources, starts, ends, olds, new_positions,
                                                   device=device, rotary=rotary)
            eng.stats.observe("retrieve_seconds", time.perf_counter() - t0)
            yield mask
            yield from layers
        finally:
            if layers is not None:
                layers.close()  # waits for copies in flight before the sources are released
            for obj in objs:
                obj.ref_count_down()

    def retrieve(self, tokens, mask: Optional[torch.Tensor], kwargs: dict) -> torch.Tensor:
        """Pure reuse: write every cached segment (re-positioned) into the paged cache; the
        tokens masked False (vLLM already has them) are neither written nor reported.
        Returns the ret_mask (CPU bool ``[N]``).

        Raises:
            ValueError / TypeError: bad tokens, mask, kvcaches or slots.
        """
        xfer = self._transfer_kwargs(kwargs)
        kvcaches = xfer["kvcaches"]
        n = len(tokens_to_list(tokens))
        gen = self.retrieve_layers(tokens, request_configs=kwargs.get("request_configs"),
                                   device=kvcaches[0].device)
        try:
            ret_mask = next(gen)
            if mask is not None:
                if mask.dtype != torch.bool or tuple(mask.shape) != (n,):
                    raise ValueError(f"mask must be bool [{n}], got {mask!r:.80}")
                ret_mask &= mask.cpu()
            for layer, buf in enumerate(gen):
                if ret_mask.any():
                    self.engine.gpu_connector.write_layer(buf, kvcaches[layer], ret_mask, **xfer)
        finally:
            gen.close()
            self.engine.gpu_connector.wait_writes()
        return ret_mask
