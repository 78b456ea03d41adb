"""RemoteReads: the read path of the RemoteBackend (gets, and the reservation of each
prefetched read's memory at lookup time; see :class:`RemoteBackend` for the contract)."""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from collections.abc import Sequence
from typing import Optional

from lmcache.keys import CacheEngineKey, LayerCacheEngineKey
from lmcache.memory.memory_obj import MemoryObj
from lmcache.serde.wire.metadata import verify_payload
from lmcache.storage.backends.reservation import Reservation


def release_when_done(future: "Future[Optional[MemoryObj]]") -> None:
    """Drop the caller's reference on the future's MemoryObj once it completes (for results
    nobody will read: a timed-out or unneeded get)."""

    def _drop(f: Future) -> None:
        if not f.cancelled() and f.exception() is None and f.result() is not None:
            f.result().ref_count_down()

    future.add_done_callback(_drop)


class RemoteReads:
    """The gets of :class:`~lmcache.storage.backends.remote.RemoteBackend` (its base class;
    they use its connector, serde, allocator_backend, layout, breaker, getter pool, upload
    queue ``_pending`` and ``stats``)."""

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        """The chunk in new allocator memory (+1 ref for the caller) or None (miss, failure,
        corrupt bytes, no memory, or no answer within ``blocking_timeout_secs``)."""
        future = self._submit_get(key)
        result = self._wait(future, None)
        if result is None and not future.done():
            release_when_done(future)
        return result

    def batched_get_non_blocking(
        self, keys: Sequence[CacheEngineKey]
    ) -> list["Future[Optional[MemoryObj]]"]:
        """Futures of the chunks, fetched in parallel; each result as from get_blocking (the
        caller owns each non-None result, see :func:`release_when_done`).

        The memory of each read is reserved now, in key order (a :class:`Reservation` of a
        full chunk of the layout): when it runs out, futures are returned only for the chunks
        before (fewer futures than keys; counted in ``stats["no_memory"]``, not as misses).
        A reservation is freed however its read ends (miss, corrupt, error, cancelled) or
        owned by the chunk read into it."""
        futures = []
        for key in keys:
            future = self._submit_get(key, reserve=True)
            if future is None:
                break
            futures.append(future)
        return futures

    def batched_get_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        """Fetches all keys in parallel under one deadline of ``blocking_timeout_secs`` (None
        for chunks no memory could be reserved for)."""
        futures = self.batched_get_non_blocking(keys)
        deadline = time.monotonic() + self.blocking_timeout_secs
        results = []
        for future in futures:
            result = self._wait(future, None, deadline)
            if result is None and not future.done():
                release_when_done(future)
            results.append(result)
        return results + [None] * (len(keys) - len(results))

    def _reserve_bytes(self, key: CacheEngineKey) -> int:
        """Bytes to reserve for reading ``key``: a full chunk of the layout (one layer's for a
        LayerCacheEngineKey); without a layout the largest chunk this tier has seen (0: none
        yet, the read allocates when it runs)."""
        if self.layout is not None and self.layout.chunk_size > 0:
            shape, _ = self.layout.full_chunk(layerwise=isinstance(key, LayerCacheEngineKey))
            return math.prod(shape) * self.layout.kv_dtype.itemsize
        return self._largest_chunk

    def _submit_get(self, key: CacheEngineKey, reserve: bool = False
                    ) -> "Optional[Future[Optional[MemoryObj]]]":
        """The read of ``key`` on the getter pool; with ``reserve`` its memory is reserved now
        (None when there is no room: counted in ``no_memory``)."""
        obj = self._pending.get(key)
        if obj is not None:
            try:
                obj.ref_count_up()
                done: Future = Future()
                done.set_result(obj)
                self.stats["hits"] += 1
                return done
            except RuntimeError:  # the upload finished and released it just now
                pass
        reservation: Optional[Reservation] = None
        try:
            if self._closed or self.breaker.reject():
                raise RuntimeError("closed or breaker open")
            nbytes = self._reserve_bytes(key) if reserve else 0
            if nbytes > 0:
                reservation = Reservation.reserve(self.allocator_backend, nbytes)
                if reservation is None:
                    self._no_memory()
                    return None
            future = self._getters.submit(self._fetch, key, reservation)
        except RuntimeError:
            if reservation is not None:
                reservation.release()
            missed: Future = Future()
            missed.set_result(None)
            return missed
        if reservation is not None:  # frees the block unless the chunk owns it (any ending)
            future.add_done_callback(lambda _f, r=reservation: r.release())
        return future

    def _no_memory(self) -> None:
        self.stats["no_memory"] += 1
        self._warn_once("no_memory", "no memory to read remote chunks into (counted in "
                        "no_memory, not as misses)")

    def _fetch(self, key: CacheEngineKey,
               reservation: Optional[Reservation] = None) -> Optional[MemoryObj]:
        raw = self.connector.get(key.to_string())
        if raw is None:
            self.stats["misses"] += 1
            return None
        metadata, payload = raw
        try:
            meta = verify_payload(metadata, payload, self.connector.max_payload_bytes,
                                     key.to_string(), self.layout)
            obj = self.serde.deserialize(meta, payload, reservation or self.allocator_backend)
        except ValueError as e:
            self.stats["corrupt"] += 1
            self._warn_once("corrupt", "remote chunk %s rejected (%s); a miss", key, e)
            return None
        if obj is None:
            self._no_memory()
            return None
        self.stats["hits"] += 1
        self._largest_chunk = max(self._largest_chunk, obj.nbytes)
        return obj
