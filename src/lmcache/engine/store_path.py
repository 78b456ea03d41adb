"""StorePath: the pipelined store (and prefetch-free retrieve) of LMCacheEngine (all-layers
connectors).

A store hashes, allocates and copies its chunks in growing groups (4, 8, 16, then 32 chunks):
the copy of a group is enqueued (``gpu_connector.submit_from_gpu``: on its store_stream, after an
event recorded on the caller's current stream) before the next group is hashed (the token
database's iterator is lazy) and allocated (one ``StorageManager.batched_allocate`` per group), so
host work overlaps the copy. The objects go to the tiers in one ``batched_put`` when every copy
finished: at once (``wait=True``), or on a background thread (``wait=False``). A retrieve
with no lookup prefetch to claim is pipelined the same way (:meth:`StorePath.load`: per group,
``batched_get`` then ``submit_to_gpu`` on the connector's load_stream).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Generator, Optional

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_obj import MemoryObj

if TYPE_CHECKING:
    from lmcache.engine.lmcache_engine import LMCacheEngine

GROUP_CHUNKS = (4, 8, 16, 32)  # chunks per copy group, then the last size


class StorePath:
    """The store data path of one LMCacheEngine (see module docstring)."""

    def __init__(self, engine: "LMCacheEngine") -> None:
        self.engine = engine
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: list[Future] = []
        self._lock = threading.Lock()

    def store(self, tokens, mask, kwargs: dict) -> int:
        """LMCacheEngine.store for an all-layers connector (same arguments and errors)."""
        eng = self.engine
        t0 = time.perf_counter()
        xfer, chunks = eng._begin("store", tokens, mask, kwargs, lazy=True)
        store_location = kwargs.get("store_location")  # only that tier is checked and written
        where = None if store_location is None else [store_location]
        backends = eng.storage_manager.backends
        if where is None and not all(b.keeps_puts for b in backends):
            where = [b.name for b in backends if b.keeps_puts]  # not p2p: it keeps nothing
        submit = getattr(eng.gpu_connector, "submit_from_gpu", None)
        job = _StoreJob(store_location)
        skipped, failed, searching = 0, 0, True
        try:
            for group in _groups(chunks):
                if searching:
                    # The chained hash makes the cached chunks a prefix: ask the tiers group by
                    # group until the first miss; every chunk after it is stored (a put replaces).
                    present = eng.storage_manager.contains_prefix(
                        [k for _, _, k in group], retrieve_locations=where)
                    skipped += sum(end - start for start, end, _ in group[:present])
                    if present:
                        job.parent = group[present - 1][2]
                    if present == len(group):
                        continue
                    searching = False
                    group = group[present:]
                    if job.parent is None:
                        job.parent = eng._key_before(tokens, group[0][0], kwargs)
                objs = self._allocate(group)
                if objs:
                    done = group[:len(objs)]
                    starts, ends = [c[0] for c in done], [c[1] for c in done]
                    job.add([c[2] for c in done], objs, starts, ends)
                    if submit is None:
                        eng.gpu_connector.batched_from_gpu(objs, starts, ends, **xfer)
                    else:
                        job.pending.append(submit(objs, starts, ends, **xfer))
                if len(objs) < len(group):
                    rest = list(chunks)
                    failed = (rest[-1][1] if rest else group[-1][1]) - group[len(objs)][0]
                    break
        except BaseException:
            job.abort()
            raise
        eng.stats.inc("store_requested_tokens", job.tokens + skipped + failed)
        if not kwargs.get("wait", True) and submit is not None and job.objs:
            future = self._pool().submit(self._finish, job, skipped, failed, t0, False)
            with self._lock:
                self._pending = [f for f in self._pending if not f.done()]
                self._pending.append(future)
            return job.tokens
        return self._finish(job, skipped, failed, t0, True)

    def load(self, chunks, xfer: dict, retrieve_locations) -> tuple[list, int]:
        """Retrieve's pipelined load (no lookup prefetch to claim): per group of chunks, get the
        objects of the cached prefix (``batched_get``) and enqueue their copy
        (``submit_to_gpu``: on load_stream, after the compute stream's work), so the next
        group is hashed and read while it runs; stops at the first miss. Returns (the chunks
        looked at, how many of them were loaded), after every copy finished.
        """
        eng = self.engine
        seen: list = []
        loaded, pending, held = 0, [], []
        try:
            for group in _groups(chunks):
                base = len(seen)
                seen += group
                objs = eng.storage_manager.batched_get(
                    [k for _, _, k in group], retrieve_locations=retrieve_locations,
                    accept=lambda i, obj, g=group: eng._usable(obj, g[i][1] - g[i][0]))
                held += [o for o in objs if o is not None]
                good = 0
                for (start, end, _), obj in zip(group, objs):
                    if obj is None or not eng._usable(obj, end - start):
                        break
                    good += 1
                if good:
                    pending.append(eng.gpu_connector.submit_to_gpu(
                        objs[:good], [c[0] for c in group[:good]], [c[1] for c in group[:good]],
                        **xfer))
                    loaded = base + good
                if good < len(group):
                    seen += list(chunks)  # the rest, hashed while the copies run (for the stats)
                    break
            for p in pending:
                p.wait()
        finally:
            for p in pending:  # on an error: the copies still read the objects
                try:
                    p.wait()
                except Exception:  # noqa: BLE001 - reported by the first wait
                    pass
            for obj in held:
                obj.ref_count_down()
        return seen, loaded

    def wait(self) -> None:
        """Block until every ``wait=False`` store so far reached the tiers."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Wait for the pending stores and stop the background thread. Idempotent."""
        self.wait()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="lmcache-store")
            return self._executor

    def _allocate(self, group: list) -> list[MemoryObj]:
        """MemoryObjs for a prefix of ``group``'s chunks: one batched call for its full chunks
        (only the last chunk of a sequence can be shorter), one more for a short one."""
        eng = self.engine
        sizes = [end - start for start, end, _ in group]
        full = len(sizes) if sizes[-1] == sizes[0] else len(sizes) - 1
        objs = eng.storage_manager.batched_allocate(
            eng.gpu_connector.get_shape(sizes[0]), eng.metadata.kv_dtype, full, eng.fmt)
        if len(objs) == full < len(sizes):
            obj = eng.storage_manager.allocate(
                eng.gpu_connector.get_shape(sizes[-1]), eng.metadata.kv_dtype, eng.fmt)
            if obj is not None:
                objs.append(obj)
        return objs

    def _finish(self, job: "_StoreJob", skipped: int, failed: int, t0: float,
                raise_errors: bool) -> int:
        """Wait for the job's copies, hand its objects to the tiers, count the store."""
        eng = self.engine
        try:
            for pending in job.pending:
                pending.wait()
        except Exception as err:
            job.abort()
            if raise_errors:
                raise
            eng.stats.inc("failed_stores")
            eng._warn_once("async_store", "the copy of a store(wait=False) failed (%s); its "
                           "chunks were not stored (counted in failed_stores)", err)
            return 0
        if job.objs:
            eng.storage_manager.batched_put(job.keys, job.objs, store_location=job.store_location,
                                            prefix_parent=job.parent)
        return eng._record_store(job.tokens, skipped, failed, t0)


def _groups(chunks) -> Generator[list, None, None]:
    """``chunks`` (an iterator) in lists of GROUP_CHUNKS sizes (then the last size)."""
    it = iter(chunks)
    i = 0
    while True:
        group = [c for _, c in zip(range(GROUP_CHUNKS[min(i, len(GROUP_CHUNKS) - 1)]), it)]
        if not group:
            return
        i += 1
        yield group


class _StoreJob:
    """One store's chunks in flight: keys, objects, their copies, where they go."""

    def __init__(self, store_location) -> None:
        self.store_location = store_location
        self.parent: Optional[CacheEngineKey] = None
        self.keys: list[CacheEngineKey] = []
        self.objs: list[MemoryObj] = []
        self.pending: list = []
        self.tokens = 0

    def add(self, keys, objs, starts, ends) -> None:
        self.keys += keys
        self.objs += objs
        self.tokens += sum(e - s for s, e in zip(starts, ends))

    def abort(self) -> None:
        """Wait for the copies already enqueued (they write into the objects), release all."""
        for pending in self.pending:
            try:
                pending.wait()
            except Exception:  # noqa: BLE001 - the objects are released either way
                pass
        self.pending = []
        for obj in self.objs:
            obj.ref_count_down()
        self.objs, self.keys = [], []
