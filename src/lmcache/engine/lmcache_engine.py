"""LMCacheEngine: store / retrieve / lookup of KV chunks for one worker (DESIGN.md §1, §4)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Iterable
from typing import Optional, Union

import torch

from lmcache.engine.blend_retriever import BlendRetriever, is_blend_connector
from lmcache.engine.layerwise import LayerwisePath, drain, is_layerwise
from lmcache.engine.store_path import StorePath
from lmcache.gpu_connector.base import GPUConnectorInterface
from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata
from lmcache.observability.stats import LMCStatsMonitor
from lmcache.token_database.base import TokenDatabase, Tokens
from lmcache.token_database.chunked import ChunkedTokenDatabase

logger = logging.getLogger(__name__)

DEFAULT_PIN_LEASE_SECS = 600.0
_ENGINE_KWARGS = ("request_configs", "lookup_id", "req_id",  # not for the connector
                  "store_location", "retrieve_locations", "wait")


class LMCacheEngine:
    """Joins the token database, GPU connector and storage tiers of one worker.

    Data paths (DESIGN.md §1): store = chunks → allocate → gather (connector) → every tier;
    retrieve = chunks → longest contiguous prefix over the tiers → scatter → ret_mask;
    lookup = how many leading tokens are cached (optionally pinned until ``lookup_unpin``).
    With a layerwise gpu_connector (KV_T2D) chunks are stored per layer (LayerCacheEngineKey)
    through :mod:`lmcache.engine.layerwise`; store/retrieve then run those generators whole.
    Reference counts (§4.8): the store path hands its allocation to ``batched_put``, which
    drops it; every object returned by ``batched_get`` is released here after the scatter.

    Transfer kwargs of ``store``/``retrieve`` (forwarded to the connector): ``kvcaches``
    (list of per-layer paged tensors), ``slot_mapping`` (int tensor of the full sequence's
    slots, -1 = padding), ``offset`` (leading tokens not covered by slot_mapping). Engine
    kwargs: ``request_configs`` (dict; ``lmcache.tag.<t>`` entries become key tags),
    ``lookup_id`` / ``req_id`` (retrieve takes that lookup's prefetched chunks and releases its
    pins), ``store_location`` (store: the one tier name to write to, e.g. "LocalDiskBackend")
    and ``retrieve_locations`` (retrieve: the tier names to read from) — see StorageManager.
    ``req_id`` / ``lookup_id`` also name the request whose chunk hashes the token database
    keeps (ChunkedTokenDatabase): a request's lookup, retrieve and store hash its tokens once.
    ``wait`` (store, default True): False returns once the copy is enqueued (see :meth:`store`).

    Args:
        metadata: this worker's LMCacheMetadata.
        token_database: cuts tokens into (start, end, key) chunks.
        gpu_connector: moves KV between the paged cache and MemoryObjs.
        storage_manager: the tiers (``lmcache.storage.manager.StorageManager`` interface).
        pin_lease_secs: longest time (seconds, > 0) the pins (and prefetched memory) of one
            ``lookup(pin=True)`` are held when no retrieve or ``lookup_unpin`` releases them
            (a request the scheduler abandoned); released at the next lookup or unpin after.

    Pins carry the request's lifetime: ``lookup_unpin(lookup_id)`` releases them, also the
    pins of a lookup still running at that moment (it releases what it took when it ends,
    however late), and a lease bounds them when nobody calls it.

    Attributes:
        stats: LMCStatsMonitor with this engine's counters (own Prometheus registry).
        counters: ``abandoned_lookups`` (lookups that finished after their request's unpin and
            released what they took), ``expired_pin_leases`` (pin sets released by the lease).

    Raises:
        TypeError: a collaborator of the wrong type.  ValueError: pin_lease_secs <= 0.
    """

    def __init__(self, metadata: LMCacheMetadata, token_database: TokenDatabase,
                 gpu_connector: GPUConnectorInterface, storage_manager,
                 pin_lease_secs: float = DEFAULT_PIN_LEASE_SECS) -> None:
        for name, value, cls in (("metadata", metadata, LMCacheMetadata),
                                 ("token_database", token_database, TokenDatabase),
                                 ("gpu_connector", gpu_connector, GPUConnectorInterface)):
            if not isinstance(value, cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
        if isinstance(pin_lease_secs, bool) or not pin_lease_secs > 0:
            raise ValueError(f"pin_lease_secs must be > 0 seconds, got {pin_lease_secs!r}")
        self.pin_lease_secs = float(pin_lease_secs)
        self.metadata = metadata
        self.token_database = token_database
        self.gpu_connector = gpu_connector
        self.storage_manager = storage_manager
        self.fmt = MemoryFormat.KV_MLA_FMT if metadata.use_mla else MemoryFormat.KV_2LTD
        self.is_layerwise = is_layerwise(gpu_connector)
        self._layerwise = LayerwisePath(self) if self.is_layerwise else None
        self._blend = BlendRetriever(self) if is_blend_connector(gpu_connector) else None
        self.stats = LMCStatsMonitor(metadata.model_name, metadata.worker_id,
                                     getattr(storage_manager, "tier_stats", None))
        self._lookup_pins: dict[object, list[CacheEngineKey]] = {}
        self._pin_expiry: OrderedDict[object, float] = OrderedDict()  # lookup_id -> deadline
        self._inflight: dict[object, object] = {}  # lookup_id -> token of the running lookup
        self.counters = {"abandoned_lookups": 0, "expired_pin_leases": 0}
        self._lock = threading.Lock()
        self._warned: set[str] = set()  # log-once topics
        self._closed = False
        self._hash_cache = isinstance(token_database, ChunkedTokenDatabase)
        self._store_path = StorePath(self)

    # ---- store --------------------------------------------------------------------------
    def store(self, tokens: Tokens, mask: Optional[torch.Tensor] = None, **kwargs) -> int:
        """Store the KV of the chunks of ``tokens`` selected by ``mask``; returns tokens stored.

        ``tokens``: 1-D int tensor or list of ints, the whole sequence; ``mask``: store_mask, 1-D
        bool, False prefix (already stored, a multiple of chunk_size); ``kwargs``: transfer
        kwargs, ``request_configs``, ``req_id`` and ``wait`` (class docstring). Chunks already
        cached in some tier are skipped. When memory runs out the prefix of chunks that fit is
        stored and the rest is counted in ``failed_store_tokens`` (logged once); a store never
        blocks for memory.

        Pipelined: chunks are hashed, allocated (one call per group) and copied in growing
        groups; the copy of a group (on the connector's store_stream, after an event recorded on
        the caller's current stream, so it reads the KV only after the compute enqueued before
        this call wrote it) runs while the next group is hashed and allocated. ``wait=False``
        (connectors with ``submit_from_gpu``): return without waiting for the copies; the
        chunks reach the tiers when they finish (a background thread), the return value counts
        them already, and :meth:`wait_for_stores` waits for them. (On the H200 the call itself
        was still seen to return only after the compute stream's pending work: docs/GPU_NOTES.md,
        session 8.) The caller must then keep the
        stored pages unchanged until the store finished (vLLM: no block reuse before).

        Raises:
            ValueError / TypeError: bad mask, tokens, kvcaches (naming shape/dtype) or slots
                (with ``wait=False`` a bad slot found by the copy is logged and counted in
                ``failed_stores`` instead).
            RuntimeError: the engine is closed.
        """
        if self._layerwise is not None:
            return drain(self.store_layer(tokens, mask, **kwargs))
        if self._blend is not None:
            return self._blend.store(tokens, mask, kwargs)
        return self._store_path.store(tokens, mask, kwargs)

    def wait_for_stores(self) -> None:
        """Block until every ``store(..., wait=False)`` so far reached the tiers."""
        self._store_path.wait()

    def _record_store(self, stored: int, skipped: int, failed: int, t0: float) -> int:
        """Counts a finished store (tokens stored/skipped, failures, seconds since ``t0``,
        a ``time.perf_counter()`` value); returns ``stored``."""
        self.stats.inc("stored_tokens", stored)
        self.stats.inc("store_skipped_tokens", skipped)
        if failed:
            self._count_failed_store(failed, stored)
        self.stats.observe("store_seconds", time.perf_counter() - t0)
        return stored

    def _begin(self, op: str, tokens: Tokens, mask, kwargs: dict, lazy: bool = False):
        """(connector kwargs, chunks) of a store/retrieve (``op``), checked; counts the call.
        ``lazy``: chunks as an iterator hashed as it is consumed (the caller counts
        ``<op>_requested_tokens``)."""
        self._check_open()
        self._check_locations(kwargs.get("store_location"), kwargs.get("retrieve_locations"))
        xfer = self._transfer_kwargs(kwargs)
        t0 = time.perf_counter()
        chunks = self._chunks(tokens, mask, kwargs.get("request_configs"),
                              kwargs.get("req_id", kwargs.get("lookup_id")))
        if not lazy:
            chunks = list(chunks)
            self.stats.inc(f"{op}_requested_tokens", sum(e - s for s, e, _ in chunks))
        self.stats.observe("process_tokens_seconds", time.perf_counter() - t0)
        self.stats.inc(f"{op}_requests")
        return xfer, chunks

    def _chunks(self, tokens: Tokens, mask, request_configs, request_id):
        """The token database's chunks, through its per-request hash cache when it has one."""
        if self._hash_cache and request_id is not None:
            return self.token_database.process_tokens(
                tokens, mask, request_configs=request_configs, request_id=request_id)
        return self.token_database.process_tokens(tokens, mask, request_configs=request_configs)

    def _key_before(self, tokens: Tokens, start: int, kwargs: dict) -> Optional[CacheEngineKey]:
        """The key of the chunk that ends at ``start`` (the store_mask's prefix), or None."""
        if start == 0:
            return None
        request_id = kwargs.get("req_id", kwargs.get("lookup_id"))
        before = list(self._chunks(tokens[:start], None, kwargs.get("request_configs"),
                                   request_id))
        return before[-1][2] if before else None

    def _count_failed_store(self, failed: int, stored: int) -> None:
        self.stats.inc("failed_stores")
        self.stats.inc("failed_store_tokens", failed)
        self._warn_once("memory", "no memory for %d tokens (stored %d); further failures are "
                        "only counted in lmcache_failed_store_tokens", failed, stored)

    def _warn_once(self, topic: str, msg: str, *args) -> None:
        """Warn the first time per topic, then log at debug level."""
        log = logger.debug if topic in self._warned else logger.warning
        self._warned.add(topic)
        log("LMCacheEngine: " + msg, *args)

    # ---- retrieve -----------------------------------------------------------------------
    def retrieve(self, tokens: Tokens, mask: Optional[torch.Tensor] = None,
                 **kwargs) -> torch.Tensor:
        """Load the longest cached contiguous prefix of chunks into the paged cache.

        ``tokens`` as :meth:`store`; ``mask``: token_mask, False prefix (vLLM already has those
        tokens; a multiple of chunk_size); ``kwargs``: transfer kwargs, ``request_configs``,
        ``lookup_id`` or ``req_id`` (that lookup's pins are released at the end, also on error).
        Returns the ret_mask: CPU bool ``[len(tokens)]``, True exactly for the tokens loaded.

        Raises:
            ValueError / TypeError: bad mask, tokens, kvcaches or slots.
            RuntimeError: the engine is closed.
        """
        if self._layerwise is not None:
            return drain(self.retrieve_layer(tokens, mask, **kwargs))
        if self._blend is not None:
            return self._blend.retrieve(tokens, mask, kwargs)
        t0 = time.perf_counter()
        lookup_id = kwargs.get("lookup_id", kwargs.get("req_id"))
        try:
            has_prefetch = getattr(self.storage_manager, "has_prefetch", None)
            if hasattr(self.gpu_connector, "submit_to_gpu") and (lookup_id is None or (
                    has_prefetch is not None and not has_prefetch(lookup_id))):
                # no prefetch to claim: hash (or take the request's hashes), get and copy
                # group by group
                xfer, lazy = self._begin("retrieve", tokens, mask, kwargs, lazy=True)
                chunks, loaded = self._store_path.load(lazy, xfer, kwargs.get("retrieve_locations"))
                self.stats.inc("retrieve_requested_tokens", sum(e - s for s, e, _ in chunks))
            else:
                xfer, chunks = self._begin("retrieve", tokens, mask, kwargs)
                loaded = self._load_prefix(chunks, xfer, lookup_id,
                                           kwargs.get("retrieve_locations"))
            ret_mask = torch.zeros(len(tokens), dtype=torch.bool)
            if loaded:
                ret_mask[chunks[0][0]:chunks[loaded - 1][1]] = True
                self.stats.inc("retrieve_hit_tokens", chunks[loaded - 1][1] - chunks[0][0])
        finally:
            if lookup_id is not None:
                self.lookup_unpin(lookup_id)
        self.stats.observe("retrieve_seconds", time.perf_counter() - t0)
        return ret_mask

    def _load_prefix(self, chunks: list, xfer: dict, lookup_id=None,
                     retrieve_locations=None) -> int:
        """Scatter the contiguous cached prefix of ``chunks`` (using ``lookup_id``'s prefetch,
        reading only ``retrieve_locations``); returns how many chunks."""
        keys = [key for _, _, key in chunks]
        objs: list[Optional[MemoryObj]] = self.storage_manager.batched_get(
            keys, lookup_id=lookup_id, retrieve_locations=retrieve_locations,
            accept=lambda i, obj: self._usable(obj, chunks[i][1] - chunks[i][0])) if keys else []
        good = 0
        for (start, end, _), obj in zip(chunks, objs):
            if obj is None or not self._usable(obj, end - start):
                break
            good += 1
        try:
            if good:
                self.gpu_connector.batched_to_gpu(
                    objs[:good], [c[0] for c in chunks[:good]], [c[1] for c in chunks[:good]],
                    **xfer)
        finally:
            for obj in objs:
                if obj is not None:
                    obj.ref_count_down()
        return good

    def _usable(self, obj: MemoryObj, num_tokens: int) -> bool:
        """A tier's object of the wrong shape/dtype is a miss, never wrong KV."""
        want = self.gpu_connector.get_shape(num_tokens)
        if obj.shape == want and obj.dtype == self.metadata.kv_dtype:
            return True
        self._warn_once("bad_obj", "cached object %r does not match expected shape %s dtype %s;"
                        " treated as a miss", obj, tuple(want), self.metadata.kv_dtype)
        return False

    # ---- layerwise (protocol, yields and errors: lmcache.engine.layerwise) ----------------
    def store_layer(self, tokens: Tokens, mask: Optional[torch.Tensor] = None,
                    **kwargs) -> Generator:
        """Store layer by layer: one ``next()`` per layer in layer order (the first allocates
        every (chunk, layer) object), then one more that puts them and yields the tokens stored.
        Arguments and rules as :meth:`store` (a chunk is stored with all its layers or not at
        all). TypeError without a layerwise gpu_connector; other errors as :meth:`store`."""
        return (self._layerwise or LayerwisePath(self)).store_layer(tokens, mask, kwargs)

    def retrieve_layer(self, tokens: Tokens, mask: Optional[torch.Tensor] = None,
                       **kwargs) -> Generator:
        """Retrieve layer by layer: the first ``next()`` gets the chunk prefix with every layer
        cached (yields its token count), one ``next()`` per layer loads it (yields a LayerTransfer
        or None), the last yields the ret_mask. Arguments as :meth:`retrieve`. TypeError without a
        layerwise gpu_connector; other errors as :meth:`retrieve`."""
        return (self._layerwise or LayerwisePath(self)).retrieve_layer(tokens, mask, kwargs)

    # ---- CacheBlend (gpu_connector=vllm_buffer_layerwise; lmcache.engine.blend_retriever) --
    def blend_lookup(self, tokens: Tokens, request_configs: Optional[dict] = None) -> torch.Tensor:
        """CPU bool ``[len(tokens)]``: True for the tokens of every cached segment (their sum
        is the number of blendable tokens). TypeError without the CacheBlend data path."""
        return self._blend_path().lookup(tokens, request_configs)

    def retrieve_layers_for_blend(self, tokens: Tokens, new_positions=None,
                                  request_configs: Optional[dict] = None,
                                  device=None, rotary=None) -> Generator:
        """Generator: first the cached-token mask (CPU bool ``[N]``), then per layer the
        buffer ``[2, N, H, D]`` of reused KV at ``new_positions`` (default ``arange(N)``),
        K re-positioned by ``rotary`` (default: the connector's), gaps zero
        (BlendRetriever.retrieve_layers). TypeError without the CacheBlend path."""
        return self._blend_path().retrieve_layers(tokens, new_positions, request_configs, device,
                                                  rotary)

    def _blend_path(self) -> BlendRetriever:
        if self._blend is None:
            raise TypeError("CacheBlend retrieval needs token_database=segment and "
                            "gpu_connector=vllm_buffer_layerwise, got gpu_connector "
                            f"{type(self.gpu_connector).__name__}")
        return self._blend

    # ---- lookup -------------------------------------------------------------------------
    def lookup(self, tokens: Tokens, pin: bool = False, lookup_id: object = None,
               request_configs: Optional[dict] = None, retrieve_locations=None) -> int:
        """Number of leading tokens cached (contiguous chunk prefix over the tiers).

        A trailing partial chunk counts when it is stored (save_unfull_chunk). With
        ``pin=True`` the counted chunks stay pinned (not evictable) until
        ``lookup_unpin(lookup_id)`` or a ``retrieve(..., lookup_id=...)``; chunks only a slower
        tier holds are then prefetched for that retrieve (StorageManager.contains_prefix).
        A ``lookup_unpin(lookup_id)`` that comes while this lookup still runs (the scheduler
        gave up on it) makes it release what it pinned and prefetched when it ends, and return
        0; pins nobody releases are released after ``pin_lease_secs``.
        ``retrieve_locations``: tier names to search (default all).

        Raises:
            ValueError: ``pin=True`` without a ``lookup_id``; bad tokens.
            RuntimeError: the engine is closed.
        """
        self._check_open()
        if pin and lookup_id is None:
            raise ValueError("lookup(pin=True) needs a lookup_id to release the pins with")
        t0 = time.perf_counter()
        chunks = list(self._chunks(tokens, None, request_configs, lookup_id))
        self.stats.observe("process_tokens_seconds", time.perf_counter() - t0)
        keys = [key for _, _, key in chunks]
        self._check_locations(None, retrieve_locations)
        self._release_expired()
        token = self._lookup_begins(lookup_id) if pin else None
        try:
            if self._layerwise is not None:  # a chunk counts only with every layer held
                hits, pinned = self._layerwise.contains_chunks(keys, pin=pin)
            else:
                hits = self.storage_manager.contains_prefix(
                    keys, pin=pin, lookup_id=lookup_id if pin else None,
                    retrieve_locations=retrieve_locations) if keys else 0
                pinned = keys[:hits]
        except BaseException:
            if pin:
                self._lookup_ends(lookup_id, token, [])  # raised: nothing left pinned by it
            raise
        if pin and not self._lookup_ends(lookup_id, token, pinned if hits else []):
            hits = 0  # abandoned: what it took is released already
        hit_tokens = chunks[hits - 1][1] if hits else 0
        self.stats.inc("lookup_requests")
        self.stats.inc("lookup_tokens", len(tokens))
        self.stats.inc("lookup_hit_tokens", hit_tokens)
        self.stats.observe("lookup_seconds", time.perf_counter() - t0)
        return hit_tokens

    def lookup_unpin(self, lookup_id: Union[object, Iterable[object]]) -> None:
        """Release the pins of ``lookup(..., pin=True, lookup_id=...)``: one id or a list/tuple
        of ids; unknown ids are ignored (the integration calls this for every finished request).
        A lookup of these ids still running releases its pins itself when it ends.
        """
        ids = lookup_id if isinstance(lookup_id, (list, tuple)) else [lookup_id]
        pins: list[tuple[object, list[CacheEngineKey]]] = []
        with self._lock:
            for one in ids:
                pins.append((one, self._lookup_pins.pop(one, [])))
                self._pin_expiry.pop(one, None)
                self._inflight.pop(one, None)  # a running lookup of it is abandoned
            self.stats.set_gauge("pinned_lookups", len(self._lookup_pins))
        for one, keys in pins:
            if keys:
                self._unpin(keys, one)
        for one in ids:  # prefetched chunks no retrieve took
            self.storage_manager.discard_prefetch(one)
        self._release_expired()

    def _unpin(self, keys: list, lookup_id: object) -> None:
        """Release one lookup's pins (in the tiers that took them, when the manager knows)."""
        if self._layerwise is None:
            self.storage_manager.unpin(keys, lookup_id=lookup_id)
        else:
            self.storage_manager.unpin(keys)

    def _lookup_begins(self, lookup_id: object) -> object:
        """Register a running pinning lookup; returns its token."""
        token = object()
        with self._lock:
            self._inflight.setdefault(lookup_id, set()).add(token)
        return token

    def _lookup_ends(self, lookup_id: object, token: object, pinned: list) -> bool:
        """Hand a finished lookup's pins to its request (True), or, when the request's unpin
        came meanwhile, release them and its prefetch now (False). Idempotent per token."""
        with self._lock:
            running = self._inflight.get(lookup_id)
            alive = running is not None and token in running
            if alive:
                running.discard(token)
                if not running:
                    del self._inflight[lookup_id]
                if pinned:
                    self._lookup_pins.setdefault(lookup_id, []).extend(pinned)
                    self._pin_expiry[lookup_id] = time.monotonic() + self.pin_lease_secs
                    self._pin_expiry.move_to_end(lookup_id)
                self.stats.set_gauge("pinned_lookups", len(self._lookup_pins))
                return True
        if pinned:
            self.counters["abandoned_lookups"] += 1
            self._unpin(pinned, lookup_id)
            self.storage_manager.discard_prefetch(lookup_id)
            self._warn_once("abandoned", "lookup %r finished after its request's unpin; its "
                            "pins and prefetch were released (counted in abandoned_lookups)",
                            lookup_id)
        return False

    def _release_expired(self) -> None:
        """Release the pin sets whose lease ran out (requests nobody unpinned)."""
        now = time.monotonic()
        expired = []
        with self._lock:
            for one, deadline in self._pin_expiry.items():
                if deadline > now:
                    break
                expired.append(one)
        if expired:
            self.counters["expired_pin_leases"] += len(expired)
            self._warn_once("lease", "pins of %d lookup(s) held past pin_lease_secs=%.0f were "
                            "released (counted in expired_pin_leases)", len(expired),
                            self.pin_lease_secs)
            self.lookup_unpin(expired)

    # ---- lifecycle ----------------------------------------------------------------------
    def clear(self) -> None:
        """Release every lookup pin and drop every stored chunk from every tier (after the
        pending stores finished)."""
        self.wait_for_stores()
        self.lookup_unpin(list(self._lookup_pins))
        self.storage_manager.clear()

    def close(self) -> None:
        """Release pins and close the storage manager. Idempotent."""
        if self._closed:
            return
        self.wait_for_stores()
        self._closed = True
        self._store_path.close()
        self.lookup_unpin(list(self._lookup_pins))
        self.storage_manager.close()

    def _check_locations(self, store_location, retrieve_locations) -> None:
        """ValueError for tier locations on the layerwise path (not supported there yet)."""
        if self._layerwise is not None and (store_location, retrieve_locations) != (None, None):
            raise ValueError("store_location / retrieve_locations are not supported with a "
                             "layerwise gpu_connector (got store_location="
                             f"{store_location!r}, retrieve_locations={retrieve_locations!r})")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("LMCacheEngine is closed")

    def _transfer_kwargs(self, kwargs: dict) -> dict:
        """The connector's kwargs, with ``kvcaches`` checked against the metadata."""
        xfer = {k: v for k, v in kwargs.items() if k not in _ENGINE_KWARGS}
        kvcaches = xfer.get("kvcaches")
        self.gpu_connector.validate_kvcaches(kvcaches)
        md = self.metadata
        if len(kvcaches) != md.num_layers:
            raise ValueError(f"kvcaches has {len(kvcaches)} layers, metadata kv_shape "
                             f"{md.kv_shape} has {md.num_layers}")
        for i, tensor in enumerate(kvcaches):
            if tensor.dtype != md.kv_dtype:
                raise ValueError(f"kvcaches[{i}] has dtype {tensor.dtype} (shape "
                                 f"{tuple(tensor.shape)}), metadata kv_dtype is {md.kv_dtype}")
        return xfer

