"""StorageManager: routes puts and gets over the ordered storage tiers.

Collaborators: TierLookup (tier selection, prefix lookup, pins), Prefetcher (lookup-time
prefetch), TierReader (reads, repair, write-back), TierStats (per-tier metrics),
PrefixRetriever (prefetch glue, retrieve loop; moved to :mod:`lmcache.storage.prefix_retriever`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from typing import Optional

import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.observability.tier_stats import TierStats
from lmcache.storage.backends.base import StorageBackendInterface
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.event_manager import EventManager
from lmcache.storage.pin_ledger import PinLedger
from lmcache.storage.prefetcher import Prefetcher
from lmcache.storage.prefix_retriever import PrefixRetriever
from lmcache.storage.tier_lookup import Locations, TierLookup
from lmcache.storage.tier_reader import Accept, TierReader

logger = logging.getLogger(__name__)

DEFAULT_BLOCKING_TIMEOUT_SECS = 10.0  # LMCache's blocking_timeout_secs default


class StorageManager:
    """The tiers of one worker, fastest first (list order is tier order).

    * Store: :meth:`batched_put` gives every object to every tier (each tier keeps its own
      reference), or only to the tier named by ``store_location``, then drops the producer's
      reference. The keys of one call are consecutive chunks of one prefix; ``prefix_parent``
      (the chunk before the first) lets each tier keep the prefix chain for eviction
      (``link_prefix``: a chunk is never evicted while later chunks of its prefix stay).
    * Lookup: :meth:`contains_prefix` counts the contiguous prefix of chunks held by any tier
      (the first chunk no tier holds ends it); with ``pin`` each counted chunk is pinned in the
      tier that answered for it (:class:`~lmcache.storage.tier_lookup.TierLookup`). With a
      ``lookup_id`` it also **prefetches** (:class:`~lmcache.storage.prefetcher.Prefetcher`)
      the counted chunks only slower tiers hold, into allocator memory reserved now; the
      promise shrinks to the chunks whose memory could be reserved.
    * Retrieve: :meth:`batched_get` serves each chunk of the contiguous hit prefix: a chunk
      prefetched under its ``lookup_id`` is taken from the prefetch (waiting only for the
      chunks it needs, all within one deadline of ``blocking_timeout_secs``); any other chunk is
      read from the first tier holding it, one ``batched_get_blocking`` per contiguous run of
      chunks of the same tier (a chunk gone from its tier meanwhile is tried in the others).
    * **Repair** (an entry indexed but not servable): a chunk a tier answered ``contains`` for
      and then failed to deliver is removed from that tier (``stats["repaired_entries"]``;
      :class:`~lmcache.storage.tier_reader.TierReader`).
    * Write-back: chunks served by a slower tier are put into the allocator_backend when it is
      one of the tiers; a prefetched chunk as soon as it arrives (before its event completes),
      so a repeated lookup finds it in the CPU tier instead of fetching it again.
    * ``retrieve_locations`` (lookup, block mapping, retrieve) restricts the tiers searched to
      those with the given backend names; ``store_location`` (store) the tiers written to the
      one with that name (LMCache semantics; names as ``backend.name``: ``LocalCPUBackend``).

    A tier that raises costs hits only: the error is logged once per tier and the call
    continues as if the tier missed (``num_tier_errors`` counts them). A prefetched chunk that
    fails, misses or is not there by the deadline ends the retrieved prefix (no second wait).

    Args:
        backends: the tiers, in order.
        allocator_backend: the LocalCPUBackend that allocates MemoryObjs; None → the first
            LocalCPUBackend in ``backends`` (allocate then raises RuntimeError if there is none).
        event_manager: holds the prefetch futures (default: a new EventManager whose unclaimed
            results are released with ``ref_count_down``); ignored when ``prefetcher`` is given.
        blocking_timeout_secs: how long a retrieve waits in all for the prefetched chunks it
            needs, > 0; None → the largest ``blocking_timeout_secs`` of the tiers, else 10 s.
        prefetcher: the lookup prefetch (default: a new Prefetcher over ``event_manager``).
        tier_stats: records each tier's lookups, reads and writes (default: a new TierStats;
            :mod:`lmcache.observability.tier_stats`).

    Attributes:
        stats (property): the Prefetcher's ``prefetch_chunks`` / ``prefetch_hits`` /
            ``prefetch_misses`` / ``prefetch_no_memory`` and the TierReader's
            ``repaired_entries`` / ``rejected_objects`` / ``write_back_errors``.

    Raises:
        ValueError: blocking_timeout_secs <= 0.
    """

    def __init__(
        self,
        backends: Sequence[StorageBackendInterface],
        allocator_backend: Optional[LocalCPUBackend] = None,
        event_manager: Optional[EventManager] = None,
        blocking_timeout_secs: Optional[float] = None,
        prefetcher: Optional[Prefetcher] = None,
        tier_stats: Optional[TierStats] = None,
    ) -> None:
        self.backends: list[StorageBackendInterface] = list(backends)
        if allocator_backend is None:
            allocator_backend = next(
                (b for b in self.backends if isinstance(b, LocalCPUBackend)), None
            )
        self.allocator_backend = allocator_backend
        self._write_back = allocator_backend is not None and any(
            b is allocator_backend for b in self.backends
        )
        if blocking_timeout_secs is None:
            tier_timeouts = [getattr(b, "blocking_timeout_secs", None) for b in self.backends]
            blocking_timeout_secs = max(
                (float(t) for t in tier_timeouts if isinstance(t, (int, float))),
                default=DEFAULT_BLOCKING_TIMEOUT_SECS)
        if isinstance(blocking_timeout_secs, bool) or not blocking_timeout_secs > 0:
            raise ValueError(f"blocking_timeout_secs must be > 0, got {blocking_timeout_secs!r}")
        self.blocking_timeout_secs = float(blocking_timeout_secs)
        self.prefetcher = prefetcher if prefetcher is not None else Prefetcher(event_manager)
        self.event_manager = self.prefetcher.event_manager
        self.tier_stats = tier_stats if tier_stats is not None else TierStats(self.backends)
        self.reader = TierReader(self.backends, allocator_backend, self._write_back,
                                 self.tier_stats)
        self.pins = PinLedger()
        self.lookup = TierLookup(self.backends, self._tier_error, self.pins)
        self.retriever = PrefixRetriever(self.lookup, self.reader, self.prefetcher,
                                         allocator_backend, self._tier_error, self.tier_stats)

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (class docstring)."""
        return {**self.prefetcher.stats, **self.reader.counters}

    @property
    def num_tier_errors(self) -> int:
        """Tier calls that raised (each logged once per tier)."""
        return self.reader.num_tier_errors

    @property
    def tier_names(self) -> list[str]:
        """``name`` of each tier, in tier order."""
        return self.lookup.tier_names

    # ---- allocation ---------------------------------------------------------------------
    def allocate(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        fmt: MemoryFormat = MemoryFormat.KV_2LTD,
    ) -> Optional[MemoryObj]:
        """A new MemoryObj (ref 1) from the allocator_backend (evicting if needed), or None.

        Raises:
            RuntimeError: no allocator_backend.
        """
        if self.allocator_backend is None:
            raise RuntimeError("StorageManager has no allocator_backend to allocate from")
        return self.allocator_backend.allocate(shape, dtype, fmt)

    def batched_allocate(self, shape: Sequence[int], dtype: torch.dtype, n: int,
                         fmt: MemoryFormat = MemoryFormat.KV_2LTD) -> list[MemoryObj]:
        """Up to ``n`` new MemoryObjs of one shape in one call (a prefix when memory runs out).

        Raises:
            RuntimeError: no allocator_backend.
        """
        if self.allocator_backend is None:
            raise RuntimeError("StorageManager has no allocator_backend to allocate from")
        batched = getattr(self.allocator_backend, "batched_allocate", None)
        if batched is not None:
            return batched(shape, dtype, n, fmt)
        objs = []
        for _ in range(n):
            obj = self.allocator_backend.allocate(shape, dtype, fmt)
            if obj is None:
                break
            objs.append(obj)
        return objs

    # ---- store -----------------------------------------------------------------------------
    def batched_put(self, keys: Sequence[CacheEngineKey], objs: Sequence[MemoryObj],
                    store_location: Optional[str] = None,
                    prefix_parent: Optional[CacheEngineKey] = None) -> None:
        """Put every object into every tier (or only the tier named ``store_location``), then
        drop the producer's reference of each. ``keys`` are consecutive chunks of one prefix;
        ``prefix_parent`` is the chunk before ``keys[0]`` (None: the first chunk, or unknown).

        Raises:
            ValueError: len(keys) != len(objs), or no tier is named ``store_location``;
            TypeError: store_location is not a str (no reference is dropped on these errors).
        """
        if len(keys) != len(objs):
            raise ValueError(f"batched_put got {len(keys)} keys but {len(objs)} objects")
        if store_location is not None and not isinstance(store_location, str):
            raise TypeError(f"store_location must be one backend name (str), got "
                            f"{store_location!r}")
        targets = self.lookup.select(store_location, "store_location")
        try:
            for backend in targets:
                try:
                    backend.link_prefix(keys, prefix_parent)
                    t0 = time.perf_counter()
                    backend.batched_put(keys, objs)
                    self.tier_stats.write(backend, objs, time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001 - a failing tier costs hits only
                    self._tier_error(backend, "batched_put", e)
        finally:
            for obj in objs:
                obj.ref_count_down()

    # ---- lookup -------------------------------------------------------------------------------
    def contains_prefix(self, keys: Sequence[CacheEngineKey], pin: bool = False,
                        lookup_id: Optional[Hashable] = None,
                        retrieve_locations: Locations = None) -> int:
        """Number of leading chunks held by some tier (of ``retrieve_locations``); ``pin`` pins
        them there; a ``lookup_id`` also starts the prefetch of the chunks only slower tiers
        hold (class docstring), replacing an earlier prefetch under the same id. When a
        prefetch cannot be started the count stops before that chunk (its pins released).

        Raises:
            TypeError: lookup_id is not hashable; bad retrieve_locations (see ``_tiers``).
        """
        tiers = self.lookup.select(retrieve_locations)
        if lookup_id is not None:
            hash(lookup_id)  # TypeError now, not after pinning
        owners = self.lookup.owners(keys, pin, tiers, lookup_id)
        if lookup_id is not None:
            owners = self.retriever.prefetch(lookup_id, keys, owners, pin)
        if pin:  # a lookup (vLLM's scheduler pins), not a store's check: per-tier hit rates
            self.tier_stats.lookup(tiers, owners, len(keys))
        return len(owners)

    def get_block_mapping(self, keys: Sequence[CacheEngineKey],
                          retrieve_locations: Locations = None) -> dict[str, list[int]]:
        """``{backend name: [chunk indices]}`` over the contiguous hit prefix (no pinning)."""
        mapping: dict[str, list[int]] = {}
        owners = self.lookup.owners(keys, False, self.lookup.select(retrieve_locations))
        for idx, owner in enumerate(owners):
            mapping.setdefault(owner.name, []).append(idx)
        return mapping

    def unpin(self, keys: Sequence[CacheEngineKey],
               lookup_id: Optional[Hashable] = None) -> None:
        """Remove one pin per key from the tier that took it: pins are paired per lookup_id
        (and per key without one), so a chunk pinned in the disk tier for one request is
        unpinned there even when a CPU copy of it is pinned for another."""
        for key in keys:
            self.lookup.unpin_key(key, lookup_id)

    # ---- prefetch (the Prefetcher collaborator) --------------------------------------------
    def discard_prefetch(self, lookup_id: Hashable) -> bool:
        """Release the chunks prefetched under ``lookup_id`` that no retrieve took (each when
        it arrives); False when there is no such prefetch."""
        return self.prefetcher.discard(lookup_id)

    def has_prefetch(self, lookup_id: Hashable) -> bool:
        """True while ``lookup_id``'s lookup has prefetched chunks no retrieve claimed yet."""
        return self.prefetcher.holds(lookup_id)

    @property
    def num_prefetches(self) -> int:
        """Lookups whose prefetched chunks are still held for their retrieve."""
        return len(self.prefetcher)

    # ---- retrieve --------------------------------------------------------------------------
    def batched_get(self, keys: Sequence[CacheEngineKey], lookup_id: Optional[Hashable] = None,
                    retrieve_locations: Locations = None,
                    accept: Optional[Accept] = None) -> list[Optional[MemoryObj]]:
        """One object (+1 reference for the caller) per key of the contiguous hit prefix;
        None from the first miss on. Chunks prefetched by ``contains_prefix(...,
        lookup_id=lookup_id)`` come from that prefetch (its leftovers are released); the others
        from the tiers of ``retrieve_locations`` (default all). ``accept(i, obj)``, when given,
        vets the object of ``keys[i]`` (e.g. its shape and dtype) before it is written back or
        returned: a refused object ends the prefix and is removed from the tier it came from
        (a prefetched one from every tier)."""
        tiers = self.lookup.select(retrieve_locations)
        return self.retriever.get(keys, lookup_id, tiers, accept, self.blocking_timeout_secs)

    # ---- lifecycle ----------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every chunk from every tier (prefetches held for lookups stay until their
        retrieve or :meth:`discard_prefetch`)."""
        for backend in self.backends:
            try:
                backend.clear()
            except Exception as e:  # noqa: BLE001
                self._tier_error(backend, "clear", e)

    def close(self) -> None:
        """Release every prefetch (as each arrives), then close every tier (and the
        allocator_backend if it is not a tier)."""
        self.prefetcher.close()
        closing = list(self.backends)
        if self.allocator_backend is not None and not self._write_back:
            closing.append(self.allocator_backend)
        for backend in closing:
            try:
                backend.close()
            except Exception as e:  # noqa: BLE001
                self._tier_error(backend, "close", e)

    def _tier_error(self, backend: StorageBackendInterface, op: str, err: Exception) -> None:
        self.reader.tier_error(backend, op, err)
