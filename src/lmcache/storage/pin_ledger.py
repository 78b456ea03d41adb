"""PinLedger: which tier took each lookup pin, so that the unpin goes back to that tier."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from typing import Optional

from lmcache.keys import CacheEngineKey
from lmcache.storage.backends.base import StorageBackendInterface


class PinLedger:
    """Pins taken by ``StorageManager.contains_prefix(pin=True)``, per lookup_id and key.

    A chunk can be pinned in the disk tier for one request and, once written back, in the CPU
    tier for another; unpinning "the first tier that has a pin" would release the wrong one
    and leave the disk pin behind forever. The ledger pairs each unpin with the pin its
    lookup took (oldest first; pins taken without a lookup_id are paired per key). Thread-safe.
    """

    def __init__(self) -> None:
        self._owners: dict[Optional[Hashable],
                           dict[CacheEngineKey, list[StorageBackendInterface]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Pins recorded and not yet popped."""
        with self._lock:
            return sum(len(v) for bucket in self._owners.values() for v in bucket.values())

    def record(self, keys: Sequence[CacheEngineKey], backend: StorageBackendInterface,
               lookup_id: Optional[Hashable]) -> None:
        """``backend`` pinned each of ``keys`` for ``lookup_id`` (None: no lookup)."""
        with self._lock:
            bucket = self._owners.setdefault(lookup_id, {})
            for key in keys:
                bucket.setdefault(key, []).append(backend)

    def pop(self, key: CacheEngineKey,
            lookup_id: Optional[Hashable]) -> Optional[StorageBackendInterface]:
        """The tier holding ``lookup_id``'s oldest pin of ``key`` (else a pin taken without a
        lookup_id), forgotten now; None when the ledger has none."""
        with self._lock:
            for bucket_id in dict.fromkeys((lookup_id, None)):
                bucket = self._owners.get(bucket_id)
                owners = bucket.get(key) if bucket else None
                if owners:
                    backend = owners.pop(0)
                    if not owners:
                        del bucket[key]
                        if not bucket:
                            del self._owners[bucket_id]
                    return backend
        return None
