"""LocalDiskBackend: the local-disk tier (L2), one file per chunk, restart-safe.

Its parts: the read path :class:`~lmcache.storage.backends.disk_reads.DiskReads`, the write
path :class:`~lmcache.storage.backends.disk_writes.DiskWrites` (both base classes), the chunk
files :mod:`~lmcache.storage.backends.disk_files`, the prefix-link log
:mod:`~lmcache.storage.backends.disk_links`; this module keeps the index, pins, removal and the
rebuild at start.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata
from lmcache.serde.base import Allocating, Serde
from lmcache.serde.naive import NaiveSerde
from lmcache.serde.wire.chunk_file import FILE_HEADER_SIZE
from lmcache.serde.wire.chunk_layout import ChunkLayout
from lmcache.serde.wire.remote_metadata import RemoteMetadata
from lmcache.storage import name_limits
from lmcache.storage.backends import disk_files, disk_links
from lmcache.storage.backends.base import KV_EVICT, StorageBackendInterface
from lmcache.storage.backends.disk_names import key_to_filename
from lmcache.storage.backends.disk_reads import DiskReads
from lmcache.storage.backends.disk_writes import DiskWrites
from lmcache.storage.policy.base import CachePolicy
from lmcache.storage.policy.prefix_chain import PrefixChain

logger = logging.getLogger(__name__)


class LocalDiskBackend(DiskReads, DiskWrites, StorageBackendInterface):
    """KV chunks as files ``<local_disk>/<encoded key>.kvc`` (layout:
    :mod:`lmcache.serde.wire.chunk_file` = magic, 56-byte metadata with xxh3_64 checksum, payload).

    * Stores never wait for the disk: ``put`` takes the tier's own reference on the MemoryObj
      and queues the write (temporary file, then atomic rename) on ``num_writers`` threads,
      which drop the reference when done; meanwhile the chunk is served from that memory.
    * Reads go into memory from ``allocator_backend.allocate`` and are verified (size, header,
      shape, checksum); a torn, truncated, garbled or wrong-shape file is a miss and is
      deleted (``stats["corrupt"]``). :meth:`contains` checks that the file is still there with
      its size, so an entry whose file was deleted or truncated is dropped, never promised.
    * A prefetch (:meth:`batched_get_non_blocking`) reserves the memory of every read when it
      starts; it returns futures only for the chunks it could reserve memory for. A read
      that finds no memory is counted in ``stats["no_memory"]``, not as a miss.
    * Only lmcache's own files are touched: temporary files ``.tmp-lmcache-<hex>`` and chunk
      files whose name decodes to a key; other programs' files in ``local_disk`` stay.
    * At start the index is rebuilt from the files (:func:`disk_files.scan`), so the tier
      survives a restart with correct usage accounting.
    * ``max_local_disk_size`` bounds the bytes of files (headers included); eviction follows
      the policy, skipping pinned and pending chunks. When the disk itself is full (ENOSPC,
      EDQUOT, EFBIG) admissions stop with one warning, and resume once free space is seen again
      (checked at most every ``disk_full_retry_secs``); the other tiers keep working.
    * Every refused chunk is counted (``dropped_disk_full``, ``dropped_capacity``,
      ``dropped_backlog``, ``dropped_unwritable``, ``dropped_closed``) and logged once.
    * Eviction respects the prefix chain (:meth:`link_prefix`): a chunk is never evicted while
      a later chunk of its prefix stays. The links of written chunks are kept in
      ``<local_disk>/.lmcache-prefix-links`` (:mod:`disk_links`), so this holds after a
      restart too.

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
        local_disk_serde: the serde of the files (config ``local_disk_serde``, beyond LMCache);
            None or naive: the raw KV bytes (LMCache's disk files). A compressing serde
            encodes on the writer threads (capacity is reserved at the raw size and corrected
            to the file's size once written) and decodes on the reader threads. A file is
            decoded by the codec its own stream header names, whatever this instance is
            configured with; a foreign, newer or corrupt stream is a miss (deleted, counted in
            ``corrupt``), never wrong KV.

    Raises:
        ValueError: missing directory, non-positive size or thread counts; chunk file names
            or paths of this ``metadata`` longer than the file system allows (``name_limits``).
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
        local_disk_serde: Optional[Serde] = None,
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
        if metadata is not None:  # names the file system cannot hold: refused now, by name
            name_limits.check_file_names(
                self.path, name_limits.longest_keys(metadata),
                lambda k: key_to_filename(k, disk_files.SUFFIX), [disk_files.tmp_name()],
                "local_disk")
        os.makedirs(self.path, exist_ok=True)
        self.allocator_backend = allocator_backend
        self.serde = None if isinstance(local_disk_serde, NaiveSerde) else local_disk_serde
        self._decode_device = getattr(local_disk_serde, "device", "cpu")
        self.layout = ChunkLayout.from_metadata(metadata) if metadata is not None else None
        self.policy = type(policy)()
        self.capacity_bytes = int(max_local_disk_size * (1 << 30))
        self.max_pending_writes = max_pending_writes
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._index: dict[CacheEngineKey, RemoteMetadata] = {}
        self._pending: dict[CacheEngineKey, MemoryObj] = {}
        self._pins: dict[CacheEngineKey, int] = {}
        self._writing = 0  # write jobs queued or running, cleanup included
        self.chain = PrefixChain()
        self.used_bytes = 0
        self._full_gate = disk_files.FullDiskGate(self.path, disk_full_retry_secs)
        self._warned: set[str] = set()
        self.stats = dict.fromkeys(("writes", "write_errors", "dropped_disk_full",
                                    "dropped_capacity", "dropped_backlog", "dropped_unwritable",
                                    "dropped_closed", "hits", "misses", "no_memory", "corrupt",
                                    "vanished", "evictions"), 0)
        self._closed = False
        self._writers = ThreadPoolExecutor(num_writers, thread_name_prefix="lmc-disk-w")
        self._readers = ThreadPoolExecutor(num_readers, thread_name_prefix="lmc-disk-r")
        self.links = disk_links.LinkLog(self.path)
        self._rebuild_index()

    def _file(self, key: CacheEngineKey) -> str:
        return os.path.join(self.path, key_to_filename(key.to_string(), disk_files.SUFFIX))

    def __len__(self) -> int:  # chunks stored or being written
        return len(self._index) + len(self._pending)

    def contains(self, key: CacheEngineKey, pin: bool = False) -> bool:
        """True when the chunk is being written, or its file is there with the size its header
        gave (else the entry is dropped: a file deleted or truncated behind the tier's back)."""
        with self._lock:
            if key not in self._pending:
                meta = self._index.get(key)
                if meta is None:
                    return False
                try:
                    intact = os.stat(self._file(key)).st_size == FILE_HEADER_SIZE + meta.length
                except OSError:
                    intact = False
                if not intact:
                    self.stats["vanished"] += 1
                    self._warn_once("vanished", "disk chunk file of %s is gone or truncated; "
                                    "entry dropped (further ones only counted)", key)
                    self._remove_locked(key)
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

    def remove(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return self._remove_locked(key)

    def clear(self) -> int:
        with self._lock:
            keys = list(self._index) + list(self._pending)
            for key in keys:
                self._remove_locked(key)
            self.links.rewrite(())
            return len(keys)

    def close(self) -> None:
        """Finish queued writes (so they survive a restart), then stop the thread pools."""
        self._closed = True
        self._writers.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._lock:
            self.links.close()

    def keys(self) -> list[CacheEngineKey]:
        """Snapshot of the keys whose files are written (not the pending writes)."""
        with self._lock:
            return list(self._index)

    def _remove_locked(self, key: CacheEngineKey) -> bool:
        self._pins.pop(key, None)
        obj = self._pending.pop(key, None)
        meta = self._index.pop(key, None)
        if obj is None and meta is None:
            return False
        self.chain.remove(key)
        self.policy.on_remove(key)
        if obj is not None:  # the writer sees it is gone and drops its file
            self.used_bytes -= FILE_HEADER_SIZE + obj.nbytes
        if meta is not None:
            self.used_bytes -= FILE_HEADER_SIZE + meta.length
            disk_files.unlink(self._file(key))
            self._kv_event(KV_EVICT, key)
        return True

    def _discard(self, key: CacheEngineKey, problem: str) -> None:
        if problem != "vanished":  # (removed by another thread while we read: no news)
            self.stats["corrupt"] += 1
            self._warn_once("corrupt", "disk chunk %s is %s; deleted (a miss; further ones "
                            "only counted in corrupt)", key, problem)
        with self._lock:
            self._remove_locked(key)

    def _rebuild_index(self) -> None:
        for key, meta, size in disk_files.scan(self.path, self.capacity_bytes, self.layout):
            self._index[key] = meta
            self.policy.on_put(key)
            self.used_bytes += size
        for child, parent in self.links.load().items():  # links of the chunks still here
            if child in self._index and parent in self._index:
                self.chain.link([child], parent, self._index.__contains__)
        self.links.rewrite(self.chain.links())
        while self.used_bytes > self.capacity_bytes and self._index:
            order = list(self.policy.victims(list(self._index)))
            self._remove_locked(next(self.chain.victims(order), order[0]))
        logger.info("disk tier %s: %d chunks (%d bytes), %d prefix links at start", self.path,
                    len(self._index), self.used_bytes, len(self.chain))

    def _warn_once(self, what: str, msg: str, *args: object) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(msg, *args)
