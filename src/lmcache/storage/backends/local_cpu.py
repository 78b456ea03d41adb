"""LocalCPUBackend: the CPU-memory tier (L1) and the allocator_backend."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Callable, Optional

import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.storage.backends.base import KV_ADMIT, KV_EVICT, StorageBackendInterface
from lmcache.storage.policy.base import CachePolicy
from lmcache.storage.policy.prefix_chain import PrefixChain

logger = logging.getLogger(__name__)

GiB = 1024**3


class LocalCPUBackend(StorageBackendInterface):
    """KV chunks in CPU memory: ``hot_cache`` (OrderedDict[CacheEngineKey, MemoryObj]).

    The tier holds one reference on each stored object. It is also the allocator_backend:
    :meth:`allocate` carves objects from the shared allocator and, when memory is short, evicts
    stored objects in ``policy`` order — only those that :attr:`MemoryObj.can_evict` (held by
    this tier alone and unpinned), so an object being written or read, or promised to a
    retrieve by a pinning lookup, is never evicted. Nothing blocks: no room → None (counted
    in ``num_failed_allocations``). Eviction respects the prefix chain (:meth:`link_prefix`,
    :class:`PrefixChain`): a chunk is never evicted while a later chunk of its prefix stays.
    Every refused put is counted in ``num_rejected_puts`` and logged once.

    Args:
        allocator: the process's CPUMemoryAllocator (shared with the other tiers).
        policy: eviction order (LRU, FIFO, LFU, MRU).
        max_local_cpu_size: cap in GB (GiB, 1024**3 bytes, as LMCache) on the allocator bytes
            this backend lets be in use (allocation padding included); > 0.
        local_cpu: False → the allocator_backend only, not a cache tier (LMCache's
            ``local_cpu: false``): :meth:`put` keeps nothing, so nothing is served from it
            and a write-back keeps nothing; :meth:`allocate` works as usual.

    Raises:
        ValueError: max_local_cpu_size <= 0; local_cpu not a bool.
    """

    def __init__(
        self,
        allocator: CPUMemoryAllocator,
        policy: CachePolicy,
        max_local_cpu_size: float = 5.0,
        local_cpu: bool = True,
    ) -> None:
        if isinstance(max_local_cpu_size, bool) or not max_local_cpu_size > 0:
            raise ValueError(f"max_local_cpu_size must be > 0 GB, got {max_local_cpu_size!r}")
        if not isinstance(local_cpu, bool):
            raise ValueError(f"local_cpu must be a bool, got {local_cpu!r}")
        self.local_cpu = local_cpu
        self.name = "LocalCPUBackend"
        self.allocator = allocator
        self.policy = policy
        self.max_bytes = int(max_local_cpu_size * GiB)
        self.hot_cache: OrderedDict[CacheEngineKey, MemoryObj] = OrderedDict()
        self._lock = threading.RLock()
        self._held_bytes = 0
        self.num_evictions = 0
        self.num_hits = 0
        self.num_misses = 0
        self.num_rejected_puts = 0
        self.num_failed_allocations = 0
        self.num_repaired = 0
        self.chain = PrefixChain()
        self._warned_full = False

    # ---- queries ----------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """Bytes (reserved sizes) of the objects in hot_cache."""
        return self._held_bytes

    def __len__(self) -> int:
        return len(self.hot_cache)

    def keys(self) -> list[CacheEngineKey]:
        """Snapshot of the stored keys, in insertion order."""
        with self._lock:
            return list(self.hot_cache)

    def contains(self, key: CacheEngineKey, pin: bool = False) -> bool:
        """True when ``key`` is held with its memory still valid (an entry whose object was
        freed is dropped, counted in ``num_repaired``); ``pin`` pins it."""
        with self._lock:
            obj = self.hot_cache.get(key)
            if obj is None:
                return False
            if not obj.is_valid:
                self._drop_freed(key)
                return False
            if pin:
                obj.pin()
            return True

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        """The stored object with +1 reference (the caller drops it), or None; a hit is
        reported to the policy."""
        with self._lock:
            obj = self.hot_cache.get(key)
            if obj is not None and not obj.is_valid:
                self._drop_freed(key)
                obj = None
            if obj is None:
                self.num_misses += 1
                return None
            obj.ref_count_up()
            self.policy.on_hit(key)
            self.num_hits += 1
            return obj

    # ---- writes -----------------------------------------------------------------------
    def put(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        """Keep ``obj`` under ``key`` with the tier's own reference.

        Replacing a different object under the same key drops the old object's reference and
        moves its pins to the new one. If the cap cannot be kept even after evicting, the put
        is skipped (counted in ``num_rejected_puts``): a lost hit, never a crash. With
        ``local_cpu=False`` nothing is kept (the tier is off, not full: not counted).
        """
        if not self.local_cpu:
            return
        with self._lock:
            self.chain.inserted(key)  # linked first: its parent is no victim of its room
            old = self.hot_cache.get(key)
            if old is obj:
                self.policy.on_put(key)
                return
            need = obj.reserved_bytes - (old.reserved_bytes if old is not None else 0)
            if self._held_bytes + need > self.max_bytes and not self._evict_until(
                lambda: self._held_bytes + need <= self.max_bytes, exclude=key
            ):
                if old is None:
                    self.chain.remove(key)
                self.num_rejected_puts += 1
                if not self._warned_full:
                    self._warned_full = True
                    logger.warning("LocalCPUBackend full (nothing evictable): %s not stored; "
                                   "further refusals are only counted in num_rejected_puts",
                                   key)
                return
            obj.ref_count_up()
            self.hot_cache[key] = obj
            self._held_bytes += need
            if old is None:
                self._kv_event(KV_ADMIT, key)
            if old is not None:
                while old.unpin():  # the pins move (the old object keeps none: it may come
                    obj.pin()       # back under this key later, e.g. from a disk write)
                old.ref_count_down()
            self.policy.on_put(key)

    def link_prefix(self, keys: Sequence[CacheEngineKey],
                    parent: Optional[CacheEngineKey] = None) -> None:
        with self._lock:
            self.chain.link(keys, parent, self.hot_cache.__contains__)

    def unpin(self, key: CacheEngineKey) -> bool:
        with self._lock:
            obj = self.hot_cache.get(key)
            return obj.unpin() if obj is not None else False

    def remove(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return self._remove_locked(key)

    def clear(self) -> int:
        with self._lock:
            keys = list(self.hot_cache)
            for key in keys:
                self._remove_locked(key)
            return len(keys)

    def close(self) -> None:
        """Drop every stored object (the allocator itself is closed by its owner)."""
        self.clear()

    # ---- allocator_backend --------------------------------------------------------------
    def allocate(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        fmt: MemoryFormat = MemoryFormat.KV_2LTD,
        evict: bool = True,
    ) -> Optional[MemoryObj]:
        """A new MemoryObj (ref_count 1, uninitialised) or None when it cannot fit.

        With ``evict``, evictable stored objects are dropped in policy order until the
        allocation fits in the allocator and within ``max_local_cpu_size``.
        """
        size = self.allocator.reserved_size(shape, dtype)
        if size > min(self.max_bytes, self.allocator.capacity_bytes):
            return None
        result: list[Optional[MemoryObj]] = [None]

        def attempt() -> bool:
            if self.allocator.used_bytes + size > self.max_bytes:
                return False
            result[0] = self.allocator.allocate(shape, dtype, fmt)
            return result[0] is not None

        with self._lock:
            if attempt() or (evict and self._evict_until(attempt)):
                return result[0]
            self.num_failed_allocations += 1
        return None

    def batched_allocate(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        n: int,
        fmt: MemoryFormat = MemoryFormat.KV_2LTD,
    ) -> list[MemoryObj]:
        """Up to ``n`` new MemoryObjs of one shape: all of them in one allocator call when they
        fit without eviction, else one by one (evicting as :meth:`allocate`) until one does not
        fit; the list is then shorter (a prefix: the caller stores the chunks that fit)."""
        size = self.allocator.reserved_size(shape, dtype)
        many = getattr(self.allocator, "batched_allocate", None)
        with self._lock:
            if many is not None and n > 0 and self.allocator.used_bytes + n * size <= self.max_bytes:
                objs = many(shape, dtype, n, fmt)
                if objs is not None:
                    return objs
        objs = []
        for _ in range(n):
            obj = self.allocate(shape, dtype, fmt)
            if obj is None:
                break
            objs.append(obj)
        return objs

    # ---- internals ----------------------------------------------------------------------
    def _evict_until(self, done: Callable[[], bool], exclude: object = None) -> bool:
        """Evict evictable objects in policy order, leaves of the prefix chain only, until
        ``done()``; caller holds the lock."""
        for key in self.chain.victims(list(self.policy.victims(list(self.hot_cache)))):
            if key == exclude:
                continue
            obj = self.hot_cache.get(key)
            if obj is None or not obj.can_evict:
                continue
            self._remove_locked(key)
            self.num_evictions += 1
            if done():
                return True
        return False

    def _remove_locked(self, key: CacheEngineKey) -> bool:
        obj = self.hot_cache.pop(key, None)
        if obj is None:
            return False
        self._held_bytes -= obj.reserved_bytes
        self.policy.on_remove(key)
        self.chain.remove(key)
        if obj.is_valid:
            obj.ref_count_down()
        self._kv_event(KV_EVICT, key)
        return True

    def _drop_freed(self, key: CacheEngineKey) -> None:
        """An entry whose object was freed by someone else's extra release: unservable."""
        self.num_repaired += 1
        logger.error("LocalCPUBackend held freed memory for %s; entry dropped", key)
        self._remove_locked(key)
