"""StorageManager: routes puts and gets over the ordered storage tiers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.storage.backends.base import StorageBackendInterface
from lmcache.storage.backends.local_cpu import LocalCPUBackend

logger = logging.getLogger(__name__)


class StorageManager:
    """The tiers of one worker, fastest first (list order is tier order).

    * Store: :meth:`batched_put` gives every object to every tier (each tier keeps its own
      reference) and then drops the producer's reference.
    * Lookup: :meth:`contains_prefix` counts the contiguous prefix of chunks held by any tier
      (the first chunk no tier holds ends it); with ``pin`` each counted chunk is pinned in the
      tier that answered for it.
    * Retrieve: :meth:`batched_get` takes each chunk from the first tier holding it, stops at
      the first miss, and writes chunks served by a slower tier back into the
      allocator_backend when that backend is one of the tiers.

    A tier that raises costs hits only: the error is logged once per tier and the call
    continues as if the tier missed (``num_tier_errors`` counts them).

    Args:
        backends: the tiers, in order.
        allocator_backend: the LocalCPUBackend that allocates MemoryObjs; None → the first
            LocalCPUBackend in ``backends`` (allocate then raises RuntimeError if there is none).
    """

    def __init__(
        self,
        backends: Sequence[StorageBackendInterface],
        allocator_backend: Optional[LocalCPUBackend] = None,
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
        self.num_tier_errors = 0
        self._logged: set[int] = set()

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

    # ---- store -----------------------------------------------------------------------------
    def batched_put(self, keys: Sequence[CacheEngineKey], objs: Sequence[MemoryObj]) -> None:
        """Put every object into every tier, then drop the producer's reference of each.

        Raises:
            ValueError: len(keys) != len(objs) (no reference is dropped then).
        """
        if len(keys) != len(objs):
            raise ValueError(f"batched_put got {len(keys)} keys but {len(objs)} objects")
        try:
            for backend in self.backends:
                try:
                    backend.batched_put(keys, objs)
                except Exception as e:  # noqa: BLE001 - a failing tier costs hits only
                    self._tier_error(backend, "batched_put", e)
        finally:
            for obj in objs:
                obj.ref_count_down()

    # ---- lookup -------------------------------------------------------------------------------
    def _prefix_owners(self, keys: Sequence[CacheEngineKey], pin: bool) -> list[int]:
        """Index of the tier answering for each chunk of the contiguous hit prefix."""
        owners: list[int] = []
        n = len(keys)
        while len(owners) < n:
            pos = len(owners)
            for i, backend in enumerate(self.backends):
                try:
                    hit = backend.batched_contains(keys[pos:], pin=pin)
                except Exception as e:  # noqa: BLE001
                    self._tier_error(backend, "batched_contains", e)
                    continue
                if hit > 0:
                    owners.extend([i] * min(hit, n - pos))
                    break
            else:
                break
        return owners

    def contains_prefix(self, keys: Sequence[CacheEngineKey], pin: bool = False) -> int:
        """Number of leading chunks held by some tier; ``pin`` pins them there."""
        return len(self._prefix_owners(keys, pin))

    def get_block_mapping(self, keys: Sequence[CacheEngineKey]) -> dict[str, list[int]]:
        """``{backend name: [chunk indices]}`` over the contiguous hit prefix (no pinning)."""
        mapping: dict[str, list[int]] = {}
        for idx, owner in enumerate(self._prefix_owners(keys, pin=False)):
            mapping.setdefault(self.backends[owner].name, []).append(idx)
        return mapping

    def unpin(self, keys: Sequence[CacheEngineKey]) -> None:
        """Remove one pin per key, from the first tier in which the key holds a pin."""
        for key in keys:
            for backend in self.backends:
                try:
                    if backend.unpin(key):
                        break
                except Exception as e:  # noqa: BLE001
                    self._tier_error(backend, "unpin", e)

    # ---- retrieve --------------------------------------------------------------------------
    def batched_get(self, keys: Sequence[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        """One object (+1 reference for the caller) per key of the contiguous hit prefix;
        None from the first miss on."""
        out: list[Optional[MemoryObj]] = [None] * len(keys)
        for idx, key in enumerate(keys):
            obj = None
            for backend in self.backends:
                try:
                    obj = backend.get_blocking(key)
                except Exception as e:  # noqa: BLE001
                    self._tier_error(backend, "get_blocking", e)
                    obj = None
                if obj is not None:
                    if self._write_back and backend is not self.allocator_backend:
                        self._put_back(key, obj)
                    break
            if obj is None:
                break
            out[idx] = obj
        return out

    def _put_back(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        try:
            self.allocator_backend.put(key, obj)
        except Exception as e:  # noqa: BLE001 - write-back is an optimisation
            self._tier_error(self.allocator_backend, "write-back put", e)

    # ---- lifecycle ----------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every chunk from every tier."""
        for backend in self.backends:
            try:
                backend.clear()
            except Exception as e:  # noqa: BLE001
                self._tier_error(backend, "clear", e)

    def close(self) -> None:
        """Close every tier (and the allocator_backend if it is not a tier)."""
        closing = list(self.backends)
        if self.allocator_backend is not None and not self._write_back:
            closing.append(self.allocator_backend)
        for backend in closing:
            try:
                backend.close()
            except Exception as e:  # noqa: BLE001
                self._tier_error(backend, "close", e)

    def _tier_error(self, backend: StorageBackendInterface, op: str, err: Exception) -> None:
        self.num_tier_errors += 1
        if id(backend) not in self._logged:
            self._logged.add(id(backend))
            logger.error("storage tier %s failed in %s: %r (logged once per tier)",
                         getattr(backend, "name", backend), op, err)
