"""Prefetcher: the lookup-time prefetch of chunks that only slower tiers hold.

A pinning lookup with a ``lookup_id`` (StorageManager.contains_prefix) hands the chunks that only a
tier other than the allocator_backend holds (disk, remote) to :meth:`Prefetcher.start`: each run of
chunks of one tier is fetched in the background with the tier's ``batched_get_non_blocking`` into
allocator memory, and each chunk's future is registered in the EventManager as a LOADING event
``(lookup_id, key)``. The retrieve of that request takes the events it needs (:meth:`claim` /
:meth:`take`); everything else is released when it arrives (:meth:`discard`).

**Memory is reserved at lookup time.** A tier may return fewer futures than keys: it could reserve
memory only for the first ones (the disk tier allocates each read's memory when the prefetch
starts; the remote tier reserves a full chunk per read, see ``backends/reservation.py``). The promise then shrinks to the chunks whose memory is reserved, and the shortfall is
counted in ``stats["prefetch_no_memory"]`` (apart from misses), so a lookup never promises a chunk
that its retrieve would not find memory for.

**Write-back happens before the event completes.** Each registered future is this module's own,
completed only after the arrived chunk was written back into the allocator_backend. Whoever
releases the event's reference (a discard racing with the arrival included) therefore runs
strictly after the write-back took its own reference: never a ``ref_count_up`` on a freed object.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Optional

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_obj import MemoryObj
from lmcache.storage.backends.base import StorageBackendInterface
from lmcache.storage.event_manager import EventManager, EventType

WriteBack = Callable[[CacheEngineKey, MemoryObj], None]
TierError = Callable[[StorageBackendInterface, str, Exception], None]
OnRead = Callable[[StorageBackendInterface, Sequence[Future], float], None]


def _write_back_then_complete(write_back: WriteBack, key: CacheEngineKey, done: Future,
                              fetched: Future) -> None:
    """Done-callback of a tier's future: write the chunk back, then complete ``done`` with it
    (a failed or cancelled fetch completes ``done`` with None)."""
    obj = None
    if not fetched.cancelled() and fetched.exception() is None:
        obj = fetched.result()
    if obj is not None:
        try:
            write_back(key, obj)
        finally:
            done.set_result(obj)
        return
    done.set_result(None)


class Prefetcher:
    """Lookup-time prefetches, keyed by lookup_id (see the module docstring).

    Args:
        event_manager: holds the prefetch futures (default: a new EventManager whose unclaimed
            results are released with ``ref_count_down``).

    Attributes:
        stats: ``prefetch_chunks`` (started), ``prefetch_hits`` (taken by a retrieve),
            ``prefetch_misses`` (needed but failed or late), ``prefetch_no_memory`` (chunks a
            lookup did not promise because no memory could be reserved for their read).

    Thread-safe.
    """

    def __init__(self, event_manager: Optional[EventManager] = None) -> None:
        self.event_manager = event_manager if event_manager is not None else EventManager()
        self._prefetches: dict[Hashable, list[CacheEngineKey]] = {}
        self._lock = threading.Lock()
        self.stats = dict.fromkeys(("prefetch_chunks", "prefetch_hits", "prefetch_misses",
                                    "prefetch_no_memory"), 0)

    def __len__(self) -> int:
        """Lookups whose prefetched chunks are still held for their retrieve."""
        return len(self._prefetches)

    def start(self, lookup_id: Hashable, keys: Sequence[CacheEngineKey],
              owners: Sequence[StorageBackendInterface],
              skip: Optional[StorageBackendInterface], write_back: WriteBack,
              tier_error: TierError, on_read: Optional[OnRead] = None) -> int:
        """Start the background gets of ``keys[i]`` from ``owners[i]`` (runs of one tier; tiers
        that are ``skip`` or cannot fetch in the background are not prefetched), replacing an
        earlier prefetch under ``lookup_id``.

        ``on_read(backend, futures, started)``, when given, is told of each background read
        (``started``: time.perf_counter() before the tier call; per-tier metrics).

        Returns how many leading chunks stay promised: all, unless a tier failed to start its
        gets (``tier_error`` is called) or reserved memory for fewer of them.
        """
        self.discard(lookup_id)
        started: list[CacheEngineKey] = []
        count, i = len(owners), 0
        seen: set[CacheEngineKey] = set()
        for pos, key in enumerate(keys[:count]):  # (a chained hash never repeats a key)
            if key in seen:
                count = pos
                break
            seen.add(key)
        while i < count:
            backend, j = owners[i], i
            while j < count and owners[j] is backend:
                j += 1
            fetch = getattr(backend, "batched_get_non_blocking", None)
            if backend is skip or fetch is None:
                i = j
                continue
            run = list(keys[i:j])
            try:
                t0 = time.perf_counter()
                futures = list(fetch(run))
                if len(futures) > len(run):
                    raise RuntimeError(f"{len(futures)} futures for {len(run)} keys")
            except Exception as e:  # noqa: BLE001 - then the lookup promises less
                tier_error(backend, "batched_get_non_blocking", e)
                count = i
                break
            if on_read is not None:
                on_read(backend, futures, t0)
            for key, future in zip(run, futures):
                done: Future = Future()
                future.add_done_callback(partial(_write_back_then_complete, write_back, key,
                                                 done))
                self.event_manager.add_event(EventType.LOADING, (lookup_id, key), [done])
                started.append(key)
            if len(futures) < len(run):  # memory reserved for the first ones only
                self.stats["prefetch_no_memory"] += len(run) - len(futures)
                count = i + len(futures)
                break
            i = j
        if started:
            with self._lock:
                self._prefetches[lookup_id] = started
            self.stats["prefetch_chunks"] += len(started)
        return count

    def holds(self, lookup_id: Hashable) -> bool:
        """True while ``lookup_id`` has a prefetch its retrieve has not claimed."""
        with self._lock:
            return lookup_id in self._prefetches

    def discard(self, lookup_id: Hashable) -> bool:
        """Release the chunks prefetched under ``lookup_id`` that no retrieve took (each when it
        arrives); False when there is no such prefetch."""
        with self._lock:
            keys = self._prefetches.pop(lookup_id, None)
        for key in keys or ():
            self.event_manager.discard(EventType.LOADING, (lookup_id, key))
        return keys is not None

    def claim(self, lookup_id: Optional[Hashable],
              keys: Sequence[CacheEngineKey]) -> set[CacheEngineKey]:
        """End ``lookup_id``'s prefetch: the keys among ``keys`` it holds (the caller takes their
        events with :meth:`take` or :meth:`drop`); the events of the others are discarded now."""
        if lookup_id is None:
            return set()
        with self._lock:
            held = self._prefetches.pop(lookup_id, None)
        if not held:
            return set()
        wanted = set(keys)
        for key in held:
            if key not in wanted:
                self.event_manager.discard(EventType.LOADING, (lookup_id, key))
        return wanted.intersection(held)

    def take(self, lookup_id: Hashable, key: CacheEngineKey,
             deadline: float) -> Optional[MemoryObj]:
        """The claimed chunk (+1 reference for the caller), waiting until ``deadline``
        (time.monotonic()); None when it failed, missed or is late (released when it comes)."""
        got = self.event_manager.take(EventType.LOADING, (lookup_id, key), 1,
                                      timeout=max(0.0, deadline - time.monotonic()))
        obj = got[0] if got else None
        self.stats["prefetch_hits" if obj is not None else "prefetch_misses"] += 1
        return obj  # type: ignore[return-value]

    def drop(self, lookup_id: Hashable, key: CacheEngineKey) -> None:
        """Release a claimed chunk that the retrieve did not take (when it arrives)."""
        self.event_manager.discard(EventType.LOADING, (lookup_id, key))

    def close(self) -> None:
        """Release every prefetch (each chunk when it arrives)."""
        with self._lock:
            lookup_ids = list(self._prefetches)
        for lookup_id in lookup_ids:
            self.discard(lookup_id)
