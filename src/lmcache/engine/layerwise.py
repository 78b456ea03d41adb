"""LayerwisePath: LMCacheEngine's layer-by-layer store / retrieve / lookup (issue 4, DESIGN §4.4).

With a layerwise GPU connector (its ``fmt`` is KV_T2D, e.g. VLLMPagedMemLayerwiseGPUConnector) a
chunk is stored as L MemoryObjs, one per layer, each KV_T2D ``[T, 2, H*D]`` (MLA ``[T, 1, D]``),
under the chunk key's ``split_layers(L)`` (LayerCacheEngineKey, string ``...@<dtype>@<layer_id>``).

**A chunk counts as cached only when every one of its L layer keys is held** (by any tier).
LMCache checks layers 0 and L-1 only; here every layer is checked, because each layer is an
independent object in the tiers: the CachePolicy evicts objects one by one, the disk and remote
tiers write (and may fail) them one by one, so a middle layer can be gone while both ends are
there. Answering from the ends would let lookup promise KV that retrieve cannot deliver, and
pinning only the ends would leave the middle layers evictable between lookup and retrieve. The
cost is L dictionary probes per chunk on the CPU tier, in one ``batched_contains`` per tier.

Store protocol (``LMCacheEngine.store_layer``; arguments are checked at the call)::

    gen = engine.store_layer(tokens, store_mask, kvcaches=..., slot_mapping=...)
    for layer in range(L):
        next(gen)      # first call: allocation of every (chunk, layer) MemoryObj, then layer 0's
                       # copy; yields the connector's LayerTransfer (None when nothing is stored)
    stored = next(gen) # waits for every copy, puts every object into the tiers; yields tokens stored

Retrieve protocol (``LMCacheEngine.retrieve_layer``)::

    gen = engine.retrieve_layer(tokens, token_mask, kvcaches=..., slot_mapping=...)
    hit = next(gen)    # lookup + get of the contiguous chunk prefix with every layer cached;
                       # yields the number of tokens it will load
    for layer in range(L):
        t = next(gen)  # loads this layer (LayerTransfer, or None when nothing is loaded);
                       # ``t.wait_on()`` makes the compute stream wait for it
    ret_mask = next(gen)  # waits for every load; yields the ret_mask (CPU bool [len(tokens)])

Closing a generator early (``close()``, garbage collection, an error) waits for the copies in
flight, releases every MemoryObj it holds and (retrieve) the lookup's pins; nothing is put.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from typing import Optional

import torch

from lmcache.keys import CacheEngineKey, LayerCacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj


def is_layerwise(gpu_connector: object) -> bool:
    """Whether ``gpu_connector`` moves one layer at a time: its MemoryObjs are KV_T2D (§4.4)."""
    return getattr(gpu_connector, "fmt", None) == MemoryFormat.KV_T2D


def drain(gen: Generator):
    """Run a store_layer / retrieve_layer generator to its end; returns its last value."""
    last = None
    for last in gen:
        pass
    return last


class LayerwisePath:
    """The layerwise data paths of one LMCacheEngine (see the module docstring).

    Uses the engine's token database, GPU connector, storage manager, stats and checks; the
    reference-count rules are the engine's (§4.8): objects are allocated with ref 1 and handed to
    ``batched_put``; every object from ``batched_get`` is released after the last load.

    Args:
        engine: the LMCacheEngine whose ``gpu_connector`` is layerwise.
    Raises:
        TypeError: the engine's gpu_connector is not layerwise.
    """

    def __init__(self, engine) -> None:
        if not is_layerwise(engine.gpu_connector):
            raise TypeError(
                f"layerwise store/retrieve needs a layerwise gpu_connector (KV_T2D MemoryObjs, "
                f"e.g. gpu_connector=vllm_layerwise), got {type(engine.gpu_connector).__name__}")
        self.engine = engine
        self.num_layers = engine.metadata.num_layers

    # ---- lookup -------------------------------------------------------------------------
    def layer_keys(self, keys: Sequence[CacheEngineKey]) -> list[LayerCacheEngineKey]:
        """Chunk-major layer keys: chunk 0 layers 0..L-1, chunk 1 layers 0..L-1, ..."""
        return [k for key in keys for k in key.split_layers(self.num_layers)]

    def contains_chunks(
        self, keys: Sequence[CacheEngineKey], pin: bool = False
    ) -> tuple[int, list[LayerCacheEngineKey]]:
        """(leading chunks of ``keys`` with every layer held, the layer keys left pinned).

        With ``pin`` the counted chunks' layer keys stay pinned (the caller releases them); the
        layers of a chunk that is only partly held are unpinned here.
        """
        flat = self.layer_keys(keys)
        sm = self.engine.storage_manager
        held = sm.contains_prefix(flat, pin=pin) if flat else 0
        full = held // self.num_layers
        counted = full * self.num_layers
        if pin and held > counted:
            sm.unpin(flat[counted:held])
        return full, (flat[:counted] if pin else [])

    def _close(self, conn_gen: Optional[Generator]) -> None:
        """Close an abandoned connector generator (it waits for its copies); an error it
        raises then (e.g. a bad slot) is logged, since the transfer is being dropped anyway."""
        if conn_gen is None:
            return
        try:
            conn_gen.close()
        except Exception as err:  # noqa: BLE001 - cleanup must go on releasing memory
            self.engine._warn_once("abandoned", "abandoned layerwise transfer failed: %r", err)

    # ---- store --------------------------------------------------------------------------
    def store_layer(self, tokens, mask: Optional[torch.Tensor], kwargs: dict) -> Generator:
        """Check the arguments now; return the store generator (module docstring)."""
        xfer, chunks = self.engine._begin("store", tokens, mask, kwargs)
        return self._store(chunks, xfer)

    def _allocate_chunk(self, num_tokens: int) -> Optional[list[MemoryObj]]:
        """One object per layer for a chunk, or None (nothing kept) when memory runs out."""
        eng = self.engine
        shape = eng.gpu_connector.get_shape(num_tokens)
        objs: list[MemoryObj] = []
        for _ in range(self.num_layers):
            obj = eng.storage_manager.allocate(shape, eng.metadata.kv_dtype, MemoryFormat.KV_T2D)
            if obj is None:
                for got in objs:
                    got.ref_count_down()
                return None
            objs.append(obj)
        return objs

    def _store(self, chunks: list, xfer: dict) -> Generator:
        eng, sm, n_layers = self.engine, self.engine.storage_manager, self.num_layers
        t0 = time.perf_counter()
        busy = 0.0
        plan: list[tuple[int, int, list, list[MemoryObj]]] = []  # start, end, layer keys, objs
        skipped = failed = 0
        conn_gen = None
        handed_over = False
        try:
            for start, end, key in chunks:
                lkeys = key.split_layers(n_layers)
                if sm.contains_prefix(lkeys) == n_layers:
                    skipped += end - start
                    continue
                objs = self._allocate_chunk(end - start)
                if objs is None:  # all layers of a chunk or none; the rest is counted
                    failed = chunks[-1][1] - start
                    break
                plan.append((start, end, lkeys, objs))
            if plan:
                conn_gen = eng.gpu_connector.batched_from_gpu(
                    [[p[3][layer] for p in plan] for layer in range(n_layers)],
                    [p[0] for p in plan], [p[1] for p in plan], **xfer)
            for _ in range(n_layers):
                transfer = next(conn_gen) if conn_gen is not None else None
                busy += time.perf_counter() - t0
                yield transfer
                t0 = time.perf_counter()
            if conn_gen is not None:
                next(conn_gen, None)  # waits for every copy; ValueError on bad slots
                conn_gen = None
            handed_over = True  # batched_put drops the producer's references, also on error
            sm.batched_put([k for p in plan for k in p[2]], [o for p in plan for o in p[3]])
        finally:
            self._close(conn_gen)  # waits for copies in flight before their memory is released
            if not handed_over:
                for p in plan:
                    for obj in p[3]:
                        obj.ref_count_down()
        stored = sum(p[1] - p[0] for p in plan)
        eng.stats.inc("stored_tokens", stored)
        eng.stats.inc("store_skipped_tokens", skipped)
        if failed:
            eng._count_failed_store(failed, stored)
        eng.stats.observe("store_seconds", busy + time.perf_counter() - t0)
        yield stored

    # ---- retrieve -----------------------------------------------------------------------
    def retrieve_layer(self, tokens, mask: Optional[torch.Tensor], kwargs: dict) -> Generator:
        """Check the arguments now (releasing the lookup's pins on error); return the retrieve
        generator (module docstring)."""
        lookup_id = kwargs.get("lookup_id", kwargs.get("req_id"))
        try:
            xfer, chunks = self.engine._begin("retrieve", tokens, mask, kwargs)
        except BaseException:
            if lookup_id is not None:
                self.engine.lookup_unpin(lookup_id)
            raise
        return self._retrieve(chunks, xfer, len(tokens), lookup_id)

    def _usable(self, obj: Optional[MemoryObj], num_tokens: int) -> bool:
        if obj is None:
            return False
        if obj.fmt != MemoryFormat.KV_T2D:
            self.engine._warn_once("bad_fmt", "cached object %r is %s, not KV_T2D; treated as a "
                                   "miss", obj, obj.fmt.name)
            return False
        return self.engine._usable(obj, num_tokens)

    def _retrieve(self, chunks: list, xfer: dict, num_tokens: int, lookup_id) -> Generator:
        eng, n_layers = self.engine, self.num_layers
        t0 = time.perf_counter()
        busy = 0.0
        ret_mask = torch.zeros(num_tokens, dtype=torch.bool)
        objs: list[Optional[MemoryObj]] = []
        conn_gen = None
        try:
            keys = [key for _, _, key in chunks]
            full, _ = self.contains_chunks(keys)
            objs = eng.storage_manager.batched_get(self.layer_keys(keys[:full])) if full else []
            good = 0
            while good < full and all(self._usable(o, chunks[good][1] - chunks[good][0])
                                      for o in objs[good * n_layers:(good + 1) * n_layers]):
                good += 1
            if good:
                conn_gen = eng.gpu_connector.batched_to_gpu(
                    None, [c[0] for c in chunks[:good]], [c[1] for c in chunks[:good]], **xfer)
                next(conn_gen)  # prime: the loads wait for older compute
            hit = chunks[good - 1][1] - chunks[0][0] if good else 0
            busy += time.perf_counter() - t0
            yield hit
            for layer in range(n_layers):
                t0 = time.perf_counter()
                transfer = None
                if conn_gen is not None:
                    transfer = conn_gen.send([objs[c * n_layers + layer] for c in range(good)])
                busy += time.perf_counter() - t0
                yield transfer
            t0 = time.perf_counter()
            if conn_gen is not None:
                next(conn_gen, None)  # waits for every load; ValueError on a slot off the cache
                conn_gen = None
            if good:
                ret_mask[chunks[0][0]:chunks[good - 1][1]] = True
                eng.stats.inc("retrieve_hit_tokens", hit)
        finally:
            self._close(conn_gen)  # waits for loads in flight before the objects are released
            for obj in objs:
                if obj is not None:
                    obj.ref_count_down()
            if lookup_id is not None:
                eng.lookup_unpin(lookup_id)
        eng.stats.observe("retrieve_seconds", busy + time.perf_counter() - t0)
        yield ret_mask
