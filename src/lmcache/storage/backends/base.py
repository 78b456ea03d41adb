"""StorageBackendInterface: one storage tier (CPU, disk, remote, ...)."""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from typing import Callable, Optional

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_obj import MemoryObj

logger = logging.getLogger(__name__)

KV_ADMIT, KV_EVICT = 0, 1
"""Operations of a KV event (:meth:`StorageBackendInterface.add_kv_listener`)."""

KVListener = Callable[[str, int, CacheEngineKey], None]
"""``listener(tier_name, KV_ADMIT|KV_EVICT, key)``: called when a tier starts or stops holding a
key (e.g. the LMCacheWorker, which reports them to the CacheController). Called with the
tier's lock held: it must only record the event (never call back into the tier)."""


class StorageBackendInterface(abc.ABC):
    """A tier that stores MemoryObjs under CacheEngineKeys.

    Reference rules (DESIGN.md §4.8): ``put`` keeps the object by adding the tier's own
    reference (or copies it and keeps nothing of the caller's); the caller keeps and later drops
    its own. ``get_blocking`` returns an object with +1 reference for the caller, who must drop
    it. A tier that fails (I/O error, server down) must cost hits, never raise into the engine
    on the read path: return False / None and count the failure. Constructors are up to each
    tier (slower tiers normally take the allocator_backend to allocate objects they read back).

    Subclasses must set ``name`` (used by StorageManager.get_block_mapping) and implement the
    abstract methods; the batched forms default to loops over the single ones.
    """

    name: str = "StorageBackend"
    keeps_puts: bool = True
    """False for a tier whose ``put`` keeps nothing (``p2p``: it only reads from peers). A
    store's presence check asks only the tiers that keep puts: a chunk a peer holds is still
    stored locally, and a down controller does not delay stores."""
    _kv_listeners: tuple = ()

    def add_kv_listener(self, listener: KVListener) -> None:
        """Have ``listener`` told of every key this tier admits or evicts (tiers that keep an
        index report them: LocalCPUBackend, LocalDiskBackend)."""
        self._kv_listeners = (*self._kv_listeners, listener)

    def _kv_event(self, op: int, key: CacheEngineKey) -> None:
        for listener in self._kv_listeners:
            try:
                listener(self.name, op, key)
            except Exception:  # noqa: BLE001 - a listener's failure never fails the tier
                logger.exception("KV event listener failed")

    @abc.abstractmethod
    def contains(self, key: CacheEngineKey, pin: bool = False) -> bool:
        """True if the tier holds ``key``; with ``pin`` the object is also pinned (kept from
        eviction until :meth:`unpin`)."""

    def batched_contains(self, keys: Sequence[CacheEngineKey], pin: bool = False) -> int:
        """Length of the contiguous prefix of ``keys`` that the tier holds (pinning those)."""
        n = 0
        for key in keys:
            if not self.contains(key, pin=pin):
                break
            n += 1
        return n

    @abc.abstractmethod
    def put(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        """Store ``obj`` under ``key`` (the tier takes its own reference or copy)."""

    def batched_put(self, keys: Sequence[CacheEngineKey], objs: Sequence[MemoryObj]) -> None:
        """:meth:`put` each (key, obj) pair. ValueError when the lengths differ."""
        if len(keys) != len(objs):
            raise ValueError(f"batched_put got {len(keys)} keys but {len(objs)} objects")
        for key, obj in zip(keys, objs):
            self.put(key, obj)

    def link_prefix(self, keys: Sequence[CacheEngineKey],
                    parent: Optional[CacheEngineKey] = None) -> None:
        """Note that ``keys`` (about to be put) are consecutive chunks of one prefix following
        ``parent`` (None: the first chunk, or unknown). Tiers that evict use it so that a chunk
        is never evicted while later chunks of its prefix stay (``policy.prefix_chain``); the
        default keeps nothing."""

    @abc.abstractmethod
    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        """The object for ``key`` with +1 reference for the caller, or None on a miss."""

    def batched_get_blocking(
        self, keys: Sequence[CacheEngineKey]
    ) -> list[Optional[MemoryObj]]:
        """:meth:`get_blocking` for each key (None for each miss). When one raises, the
        objects already read are released and the error propagates."""
        out: list[Optional[MemoryObj]] = []
        try:
            for key in keys:
                out.append(self.get_blocking(key))
        except BaseException:
            for obj in out:
                if obj is not None:
                    obj.ref_count_down()
            raise
        return out

    @abc.abstractmethod
    def unpin(self, key: CacheEngineKey) -> bool:
        """Remove one pin from ``key``; False when the key is absent or was not pinned."""

    @abc.abstractmethod
    def remove(self, key: CacheEngineKey) -> bool:
        """Drop ``key`` (and the tier's reference); False when absent."""

    @abc.abstractmethod
    def clear(self) -> int:
        """Drop every key; returns how many were dropped."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the tier's resources (idempotent)."""
