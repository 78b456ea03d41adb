"""TierReader: the StorageManager's reads from its tiers, with repair and write-back.

* :meth:`TierReader.get_run` serves the contiguous hit prefix of a run of keys: one
  ``batched_get_blocking`` per run of chunks held by the same tier (a batch that raises is
  retried chunk by chunk, so the failing chunk is known).
* **Repair** (issue 7.1): a chunk that the tier which answered ``contains`` for it then fails to
  deliver (None, an error, an object ``accept`` refuses) is removed from that tier
  (``counters["repaired_entries"]``, logged once per tier), so no later lookup promises it and
  the engine's next store writes it again. A None while the allocator_backend failed an
  allocation meanwhile is not repaired: the tier may have missed for want of memory only.
* Write-back (:meth:`put_back`) of chunks served by slower tiers into the allocator_backend,
  linked to the chunk before it (prefix chain).
* Every tier call that raises is counted in ``num_tier_errors`` and logged once per tier.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Optional

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_obj import MemoryObj
from lmcache.storage.backends.base import StorageBackendInterface

logger = logging.getLogger(__name__)

Accept = Callable[[int, MemoryObj], bool]


class TierReader:
    """Reads chunks from a StorageManager's tiers (see the module docstring).

    Args:
        backends: every tier (a prefetched chunk an ``accept`` refuses is removed from all).
        allocator_backend: the tier allocating read memory (its ``num_failed_allocations``
            tells a miss for want of memory from a broken entry), or None.
        write_back: whether :meth:`put_back` puts into the allocator_backend.
        tier_stats: records each read (a TierStats), or None.

    Attributes:
        counters: ``repaired_entries``, ``rejected_objects``, ``write_back_errors``.
        num_tier_errors: tier calls that raised.
    """

    def __init__(self, backends: Sequence[StorageBackendInterface],
                 allocator_backend: Optional[StorageBackendInterface], write_back: bool,
                 tier_stats=None) -> None:
        self.backends = list(backends)
        self.allocator_backend = allocator_backend
        self.write_back = write_back
        self.tier_stats = tier_stats
        self.counters = dict.fromkeys(("repaired_entries", "rejected_objects",
                                       "write_back_errors"), 0)
        self.num_tier_errors = 0
        self._logged: set[object] = set()

    def get_run(self, keys: Sequence[CacheEngineKey], owners: Sequence[StorageBackendInterface],
                tiers: Sequence[StorageBackendInterface], accept: Optional[Accept], base: int,
                parent: Optional[CacheEngineKey]) -> list[MemoryObj]:
        """The contiguous hit prefix of ``keys`` (``keys[0]`` is chunk ``base`` of the request,
        ``parent`` the chunk before it): one batched_get_blocking per run of chunks held by the
        same tier (``owners[i]``: the tier that answered contains for ``keys[i]``); a chunk its
        tier fails to deliver is repaired there and tried in the other ``tiers``."""
        out: list[MemoryObj] = []
        i = 0
        while i < len(owners):
            backend, j = owners[i], i
            while j < len(owners) and owners[j] is backend:
                j += 1
            failures = self._allocation_failures()
            got = self._tier_get(backend, keys[i:j])
            batch_failed = got is None  # then each chunk alone: which one fails?
            objs = [None] * (j - i) if got is None else got
            for idx, obj in enumerate(objs):
                key = keys[i + idx]
                source = backend
                if obj is None and batch_failed:
                    obj, source = self._get_one(key, [backend])
                if obj is None:
                    self._repair(backend, key, failures)
                    others = [t for t in tiers if t is not backend]
                    obj, source = self._get_one(key, others)
                if obj is not None and not self.accepted(accept, base + i + idx, key, obj,
                                                          source):
                    obj = None
                if obj is None:
                    for rest in objs[idx + 1:]:
                        if rest is not None:
                            rest.ref_count_down()
                    return out
                if source is not self.allocator_backend:
                    self.put_back(key, obj, parent)
                parent = key
                out.append(obj)
            i = j
        return out

    def _tier_get(self, backend: StorageBackendInterface,
                  keys: Sequence[CacheEngineKey]) -> Optional[list[Optional[MemoryObj]]]:
        """The tier's objects for ``keys`` (None for each miss); None when the call raised."""
        try:
            t0 = time.perf_counter()
            objs = list(backend.batched_get_blocking(keys))
        except Exception as e:  # noqa: BLE001
            self.tier_error(backend, "batched_get_blocking", e)
            return None
        if self.tier_stats is not None:
            self.tier_stats.read(backend, objs[:len(keys)], time.perf_counter() - t0)
        for extra in objs[len(keys):]:  # a tier that returned too many: keep nothing extra
            if extra is not None:
                extra.ref_count_down()
        return objs[:len(keys)] + [None] * (len(keys) - len(objs))

    def _get_one(self, key: CacheEngineKey, tiers: Sequence[StorageBackendInterface]
                 ) -> tuple[Optional[MemoryObj], Optional[StorageBackendInterface]]:
        for backend in tiers:
            try:
                t0 = time.perf_counter()
                obj = backend.get_blocking(key)
            except Exception as e:  # noqa: BLE001
                self.tier_error(backend, "get_blocking", e)
                continue
            if self.tier_stats is not None:
                self.tier_stats.read(backend, [obj], time.perf_counter() - t0)
            if obj is not None:
                return obj, backend
        return None, None

    def accepted(self, accept: Optional[Accept], index: int, key: CacheEngineKey,
                  obj: MemoryObj, source: Optional[StorageBackendInterface]) -> bool:
        """``accept(index, obj)``; a refused object is released and its entry repaired."""
        if accept is None:
            return True
        try:
            ok = bool(accept(index, obj))
        except Exception as e:  # noqa: BLE001 - a check that fails refuses
            logger.warning("accept check of %s failed: %r; treated as a miss", key, e)
            ok = False
        if ok:
            return True
        obj.ref_count_down()
        self.counters["rejected_objects"] += 1
        for backend in ([source] if source is not None else self.backends):
            self._repair(backend, key, None)
        return False

    def _allocation_failures(self) -> int:
        return getattr(self.allocator_backend, "num_failed_allocations", 0)

    def _repair(self, backend: StorageBackendInterface, key: CacheEngineKey,
                failures: Optional[int]) -> None:
        """Remove an entry ``backend`` indexed but could not serve, so that it is no longer
        promised and the next store writes it again. Skipped when allocations failed since
        ``failures`` was read (the tier may have missed for want of memory only)."""
        if failures is not None and self._allocation_failures() != failures:
            return
        try:
            removed = backend.remove(key)
        except Exception as e:  # noqa: BLE001
            self.tier_error(backend, "remove (repair)", e)
            return
        if removed:
            self.counters["repaired_entries"] += 1
            if ("repair", id(backend)) not in self._logged:
                self._logged.add(("repair", id(backend)))  # type: ignore[arg-type]
                logger.warning("storage tier %s indexed %s but could not serve it; entry "
                               "removed (logged once per tier; counted in repaired_entries)",
                               backend.name, key)

    def put_back(self, key: CacheEngineKey, obj: MemoryObj,
                  parent: Optional[CacheEngineKey] = None) -> None:
        """Write-back of a chunk served by a slower tier into the allocator_backend."""
        if not self.write_back:
            return
        try:
            if parent is not None:
                self.allocator_backend.link_prefix([key], parent)
            self.allocator_backend.put(key, obj)
        except Exception as e:  # noqa: BLE001 - write-back is an optimisation
            self.counters["write_back_errors"] += 1
            self.tier_error(self.allocator_backend, "write-back put", e)

    def tier_error(self, backend: StorageBackendInterface, op: str, err: Exception) -> None:
        """Count a tier call that raised; log it once per tier."""
        self.num_tier_errors += 1
        if id(backend) not in self._logged:
            self._logged.add(id(backend))
            logger.error("storage tier %s failed in %s: %r (logged once per tier)",
                         getattr(backend, "name", backend), op, err)
