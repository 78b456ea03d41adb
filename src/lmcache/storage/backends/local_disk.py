"""LocalDiskBackend: the local-disk tier (L2), one file per chunk, restart-safe."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from typing import Optional

import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata
from lmcache.serde.base import Allocating
from lmcache.storage.backends import disk_files
from lmcache.storage.backends.base import StorageBackendInterface
from lmcache.storage.connectors import wire_format as wf
from lmcache.storage.policy.base import CachePolicy

logger = logging.getLogger(__name__)


class LocalDiskBackend(StorageBackendInterface):
    """KV chunks as files ``<local_disk>/<encoded key>.kvc`` (layout: ``wire_format`` file =
    magic, 36-byte metadata with xxh3_64 checksum, payload).

    * Stores never wait for the disk: ``put`` takes the tier's own reference on the MemoryObj
      and queues the write (temporary file, then atomic rename) on ``num_writers`` threads,
      which drop the reference when done; meanwhile the chunk is served from that memory.
    * Reads go into memory from ``allocator_backend.allocate`` and are verified (size, header,
      checksum); a torn, truncated or corrupt file is a miss and is deleted.
    * At start the index is rebuilt from the files (:func:`disk_files.scan`), so the tier
      survives a restart with correct usage accounting.
    * ``max_local_disk_size`` bounds the bytes of files (headers included); eviction follows
      the policy, skipping pinned and pending chunks. When the disk itself is full (ENOSPC,
      EDQUOT, EFBIG) admissions stop with one warning, and resume once free space is seen again
      (checked at most every ``disk_full_retry_secs``); the other tiers keep working.

    Args:
        allocator_backend: gives memory for reads (``allocate(shape, dtype, fmt)``).
        policy: a CachePolicy; the tier keeps a fresh instance of its class (policies hold
            per-tier state and must not be shared with the CPU tier).
        local_disk: directory (created when missing); a ``file://`` prefix is accepted.
        max_local_disk_size: capacity in GiB (1024**3 bytes, LMCache's "GB"), > 0.
        num_writers / num_readers: threads writing / reading files, >= 1.
        max_pending_writes: writes queued at most; further puts are dropped (counted).
        disk_full_retry_secs: seconds between free-space checks while the disk is full.
        metadata: this worker's LMCacheMetadata; with world_size > 1 the tier lives in
            ``<local_disk>/rank<worker_id>of<world_size>`` so ranks never share files or quota.

    Raises:
        ValueError: missing directory, non-positive size or thread counts.
        OSError: the directory cannot be created.
    """

    def __init__(
        self,
        allocator_backend: Allocating,
        policy: CachePolicy,
        local_disk: Optional[str] = None,
        max_local_disk_size: float = 0.0,
        num_writers: int = 4,
        num_readers: int = 4,
        max_pending_writes: int = 64,
        disk_full_retry_secs: float = 5.0,
        metadata: Optional[LMCacheMetadata] = None,
    ) -> None:
        if not isinstance(local_disk, str) or not local_disk:
            raise ValueError(f"local_disk must be a directory path, got {local_disk!r}")
        if isinstance(max_local_disk_size, bool) or not max_local_disk_size > 0:
            raise ValueError(f"max_local_disk_size must be > 0 GiB, got {max_local_disk_size!r}")
        if min(num_writers, num_readers, max_pending_writes) < 1:
            raise ValueError(
                f"num_writers, num_readers, max_pending_writes must be >= 1, got "
                f"{num_writers}, {num_readers}, {max_pending_writes}"
            )
        self.name = "LocalDiskBackend"
        self.path = os.path.abspath(local_disk.removeprefix("file://"))
        if metadata is not None and metadata.world_size > 1:
            # Each tensor-parallel rank keeps its own files, index and quota: a rank never
            # counts, evicts or serves another rank's shard of the KV.
            self.path = os.path.join(self.path, f"rank{metadata.worker_id}of{metadata.world_size}")
        os.makedirs(self.path, exist_ok=True)
        self.allocator_backend = allocator_backend
        self.layout = wf.ChunkLayout.from_metadata(metadata) if metadata is not None else None
        self.policy = type(policy)()
        self.capacity_bytes = int(max_local_disk_size * (1 << 30))
        self.max_pending_writes = max_pending_writes
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._index: dict[CacheEngineKey, wf.RemoteMetadata] = {}
        self._pending: dict[CacheEngineKey, MemoryObj] = {}
        self._pins: dict[CacheEngineKey, int] = {}
        self.used_bytes = 0
        self._full_gate = disk_files.FullDiskGate(self.path, disk_full_retry_secs)
        self._warned: set[str] = set()
        self.stats = dict.fromkeys(("writes", "write_errors", "dropped_disk_full",
                                    "dropped_capacity", "dropped_backlog", "hits", "misses",
                                    "corrupt", "evictions"), 0)
        self._closed = False
        self._writers = ThreadPoolExecutor(num_writers, thread_name_prefix="lmc-disk-w")
        self._readers = ThreadPoolExecutor(num_readers, thread_name_prefix="lmc-disk-r")
        self._rebuild_index()

    def _file(self, key: CacheEngineKey) -> str:
        return os.path.join(self.path, wf.key_to_filename(key.to_string(), disk_files.SUFFIX))

    def __len__(self) -> int:  # chunks stored or being written
        return len(self._index) + len(self._pending)

    def contains(self, key: CacheEngineKey, pin: bool = False) -> bool:
        with self._lock:
            if key not in self._index and key not in self._pending:
                return False
            if pin:
                self._pins[key] = self._pins.get(key, 0) + 1
            return True

    def unpin(self, key: CacheEngineKey) -> bool:
        with self._lock:
            count = self._pins.pop(key, 0)
            if count > 1:
                self._pins[key] = count - 1
            return count > 0

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        """The chunk in new allocator memory (+1 ref for the caller), or None on a miss, when
        memory is short, or when the file is bad (then it is deleted)."""
        with self._lock:
            obj = self._pending.get(key)
            if obj is not None:
                obj.ref_count_up()
                self.stats["hits"] += 1
                return obj
            meta = self._index.get(key)
            if meta is None:
                self.stats["misses"] += 1
                return None
            self.policy.on_hit(key)
        dtype = meta.dtype if meta.dtype is not None else torch.uint8
        obj = self.allocator_backend.allocate(torch.Size(meta.shape), dtype, meta.fmt)
        if obj is None:
            self.stats["misses"] += 1
            return None
        try:
            problem = disk_files.read_into(self._file(key), obj, self.capacity_bytes,
                                           self.layout)
        except FileNotFoundError:
            problem = "vanished"
        except OSError as e:
            problem = f"unreadable ({e})"
        if problem is None:
            self.stats["hits"] += 1
            return obj
        obj.ref_count_down()
        self.stats["misses"] += 1
        self._discard(key, problem)
        return None

    def batched_get_non_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Future]:
        """One future per key, read by the reader pool (each result as from get_blocking)."""
        return [self._readers.submit(self.get_blocking, k) for k in keys]

    def batched_get_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        """Reads the chunks in parallel on the reader pool."""
        if len(keys) <= 1:
            return [self.get_blocking(k) for k in keys]
        return [f.result() for f in self.batched_get_non_blocking(keys)]

    # ---- writes -------------------------------------------------------------------------
    def put(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        """Queue a write of ``obj`` (skipped when already stored, full, or backlogged)."""
        if self._closed:
            return
        try:
            meta = wf.RemoteMetadata.for_tensor(obj.tensor, obj.fmt)
            self._file(key)
        except ValueError as e:
            self._warn_once("bad", "chunk %s not written to disk: %s", key, e)
            return
        size = wf.FILE_HEADER_SIZE + meta.length
        with self._lock:
            if key in self._index or key in self._pending:
                return
            if not self._full_gate.admits(size):
                self.stats["dropped_disk_full"] += 1
                return
            if len(self._pending) >= self.max_pending_writes:
                self.stats["dropped_backlog"] += 1
                self._warn_once("backlog", "disk writes backlogged (%d pending); dropping "
                                "new chunks from the disk tier", len(self._pending))
                return
            if not self._make_room(size):
                self.stats["dropped_capacity"] += 1
                self._warn_once("capacity", "disk tier cannot make room for %d bytes", size)
                return
            obj.ref_count_up()
            self._pending[key] = obj
            self.used_bytes += size
        self._writers.submit(self._write, key, obj, meta, size)

    def _write(self, key: CacheEngineKey, obj: MemoryObj, meta: wf.RemoteMetadata, size: int):
        tmp = os.path.join(self.path, f"{disk_files.TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            disk_files.write_file(tmp, meta, obj.byte_array, key.to_string(), self.layout)
            with self._lock:
                if self._pending.get(key) is obj:  # not removed/cleared meanwhile
                    os.replace(tmp, self._file(key))
                    del self._pending[key]
                    self._index[key] = meta
                    self.policy.on_put(key)
                    self.stats["writes"] += 1
                    self._idle.notify_all()
                    return
            os.unlink(tmp)
        except OSError as e:
            self._write_failed(key, obj, size, e)
            disk_files.unlink(tmp)
        finally:
            obj.ref_count_down()

    def _write_failed(self, key: CacheEngineKey, obj: MemoryObj, size: int, e: OSError) -> None:
        with self._lock:
            self.stats["write_errors"] += 1
            if self._pending.get(key) is obj:
                del self._pending[key]
                self.used_bytes -= size
                self._idle.notify_all()
        if not self._full_gate.trip(e):
            self._warn_once(f"errno{e.errno}", "disk write of %s failed: %s", key, e)

    def _make_room(self, size: int) -> bool:
        if size > self.capacity_bytes:
            return False
        if self.used_bytes + size <= self.capacity_bytes:
            return True
        for key in self.policy.victims(list(self._index)):
            if self._pins.get(key):
                continue
            self._remove_locked(key)
            self.stats["evictions"] += 1
            if self.used_bytes + size <= self.capacity_bytes:
                return True
        return False

    def remove(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return self._remove_locked(key)

    def clear(self) -> int:
        with self._lock:
            keys = list(self._index) + list(self._pending)
            for key in keys:
                self._remove_locked(key)
            return len(keys)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every queued write has finished (or failed); False on ``timeout``
        (seconds; None = no limit)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def close(self) -> None:
        """Finish queued writes (so they survive a restart), then stop the thread pools."""
        self._closed = True
        self._writers.shutdown(wait=True)
        self._readers.shutdown(wait=True)

    def _remove_locked(self, key: CacheEngineKey) -> bool:
        self._pins.pop(key, None)
        obj = self._pending.pop(key, None)
        meta = self._index.pop(key, None)
        if obj is None and meta is None:
            return False
        if obj is not None:  # the writer sees it is gone and drops its file
            self.used_bytes -= wf.FILE_HEADER_SIZE + obj.nbytes
            self._idle.notify_all()
        if meta is not None:
            self.used_bytes -= wf.FILE_HEADER_SIZE + meta.length
            self.policy.on_remove(key)
            disk_files.unlink(self._file(key))
        return True

    def _discard(self, key: CacheEngineKey, problem: str) -> None:
        if problem != "vanished":  # (removed by another thread while we read: no news)
            self.stats["corrupt"] += 1
            logger.warning("disk chunk %s is %s; deleted (a miss)", key, problem)
        with self._lock:
            self._remove_locked(key)

    def _rebuild_index(self) -> None:
        for key, meta, size in disk_files.scan(self.path, self.capacity_bytes, self.layout):
            self._index[key] = meta
            self.policy.on_put(key)
            self.used_bytes += size
        while self.used_bytes > self.capacity_bytes and self._index:
            self._remove_locked(next(self.policy.victims(list(self._index))))
        logger.info("disk tier %s: %d chunks (%d bytes) at start", self.path, len(self._index),
                    self.used_bytes)

    def _warn_once(self, what: str, msg: str, *args: object) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(msg, *args)
