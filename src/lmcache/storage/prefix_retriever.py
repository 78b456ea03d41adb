"""PrefixRetriever: the StorageManager's prefetch glue and the retrieve of a hit prefix.

* :meth:`PrefixRetriever.prefetch` starts a lookup's prefetch
  (:class:`~lmcache.storage.prefetcher.Prefetcher`) of the counted chunks only slower tiers
  hold and shrinks the promise to the chunks whose memory could be reserved (releasing the
  pins of the others).
* :meth:`PrefixRetriever.get` serves each chunk of the contiguous hit prefix: a chunk
  prefetched under its ``lookup_id`` is taken from the prefetch (waiting only for the chunks it
  needs, all within one deadline); any other chunk is read from the first tier holding it, one
  :meth:`~lmcache.storage.tier_reader.TierReader.get_run` per contiguous run of chunks not
  prefetched (repair and write-back are the TierReader's).

Moved out of :mod:`lmcache.storage.manager` (whose public methods call it) unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from typing import Optional

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_obj import MemoryObj
from lmcache.observability.tier_stats import TierStats
from lmcache.storage.backends.base import StorageBackendInterface
from lmcache.storage.prefetcher import Prefetcher
from lmcache.storage.tier_lookup import TierError, TierLookup
from lmcache.storage.tier_reader import Accept, TierReader


class PrefixRetriever:
    """Prefetch at lookup and retrieve of a StorageManager (see the module docstring).

    Args:
        lookup: the tiers' prefix lookup and pins.
        reader: reads, repair and write-back (``put_back`` is the prefetch's write-back).
        prefetcher: the lookup prefetches, keyed by lookup_id.
        allocator_backend: the tier a prefetch never reads from (it is where chunks go), or None.
        tier_error: called with (backend, op, error) for a tier call that raised.
        tier_stats: told of each background read (``track_reads``).
    """

    def __init__(self, lookup: TierLookup, reader: TierReader, prefetcher: Prefetcher,
                 allocator_backend: Optional[StorageBackendInterface], tier_error: TierError,
                 tier_stats: TierStats) -> None:
        self.lookup = lookup
        self.reader = reader
        self.prefetcher = prefetcher
        self.allocator_backend = allocator_backend
        self.tier_error = tier_error
        self.tier_stats = tier_stats

    def prefetch(self, lookup_id: Hashable, keys: Sequence[CacheEngineKey],
                 owners: list[StorageBackendInterface],
                 pin: bool) -> list[StorageBackendInterface]:
        """Start ``lookup_id``'s prefetch of ``keys`` from their ``owners`` (replacing an
        earlier one under the same id); the leading owners that stay promised. With ``pin``,
        the chunks no longer promised are unpinned (one pin each, under ``lookup_id``)."""
        count = self.prefetcher.start(lookup_id, keys, owners, self.allocator_backend,
                                      self.reader.put_back, self.tier_error,
                                      self.tier_stats.track_reads)
        if pin:
            for key, owner in zip(keys[count:], owners[count:]):
                self.lookup.unpin_key(key, lookup_id)
        return owners[:count]

    def get(self, keys: Sequence[CacheEngineKey], lookup_id: Optional[Hashable],
            tiers: Sequence[StorageBackendInterface], accept: Optional[Accept],
            timeout_s: float) -> list[Optional[MemoryObj]]:
        """One object (+1 reference for the caller) per key of the contiguous hit prefix; None
        from the first miss on. Chunks of ``lookup_id``'s prefetch come from it (waiting at most
        ``timeout_s`` seconds in all; its leftovers are released), the others from ``tiers``.
        ``accept(i, obj)``, when given, vets the object of ``keys[i]``: a refused object ends the
        prefix and is removed from the tier it came from (a prefetched one from every tier)."""
        keys = list(keys)
        prefetched = self.prefetcher.claim(lookup_id, keys)
        deadline = time.monotonic() + timeout_s
        out: list[Optional[MemoryObj]] = [None] * len(keys)
        pos, n = 0, len(keys)
        try:
            while pos < n:
                parent = keys[pos - 1] if pos else None
                if keys[pos] in prefetched:
                    prefetched.discard(keys[pos])
                    obj = self.prefetcher.take(lookup_id, keys[pos], deadline)
                    if obj is None or not self.reader.accepted(accept, pos, keys[pos], obj,
                                                               None):
                        break
                    self.reader.put_back(keys[pos], obj, parent)  # (again, if the first was refused)
                    out[pos] = obj
                    pos += 1
                    continue
                end = pos
                while end < n and keys[end] not in prefetched:
                    end += 1
                owners = self.lookup.owners(keys[pos:end], False, tiers)
                got = self.reader.get_run(keys[pos:end], owners, tiers, accept, pos, parent)
                out[pos:pos + len(got)] = got
                if len(got) < end - pos:
                    break
                pos = end
        finally:
            for key in prefetched:  # not reached: released when they arrive
                self.prefetcher.drop(lookup_id, key)
        return out
