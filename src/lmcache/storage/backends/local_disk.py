"""LocalDiskBackend: the local-disk tier (L2), one file per chunk, restart-safe."""

from __future__ import annotations

import errno
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from typing import Optional, Union

import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata
from lmcache.serde import compressed
from lmcache.serde.base import Allocating, Serde
from lmcache.serde.naive import NaiveSerde
from lmcache.serde.wire.chunk_file import FILE_HEADER_SIZE
from lmcache.serde.wire.chunk_layout import ChunkLayout
from lmcache.serde.wire.remote_metadata import RemoteMetadata
from lmcache.storage import name_limits
from lmcache.storage.backends import disk_files, disk_links
from lmcache.storage.backends.base import KV_ADMIT, KV_EVICT, StorageBackendInterface
from lmcache.storage.backends.disk_names import key_to_filename
from lmcache.storage.policy.base import CachePolicy
from lmcache.storage.policy.prefix_chain import PrefixChain

logger = logging.getLogger(__name__)


class LocalDiskBackend(StorageBackendInterface):
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

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        """The chunk in new allocator memory (+1 ref for the caller), or None on a miss, when
        memory is short (``stats["no_memory"]``), or when the file is bad (then it is deleted)."""
        found = self._lookup(key)
        if found is None or isinstance(found, MemoryObj):
            return found
        obj = self._allocate(found)
        return None if obj is None else self._read(key, found, obj)

    def _lookup(self, key: CacheEngineKey) -> Union[None, MemoryObj, RemoteMetadata]:
        """The pending object (+1 ref), the file's metadata, or None (a miss, counted)."""
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
            return meta

    def _allocate(self, meta: RemoteMetadata) -> Optional[MemoryObj]:
        dtype = meta.dtype if meta.dtype is not None else torch.uint8
        obj = self.allocator_backend.allocate(torch.Size(meta.shape), dtype, meta.fmt)
        if obj is None:
            self.stats["no_memory"] += 1
            self._warn_once("no_memory", "no memory to read disk chunks into (counted in "
                            "no_memory)")
        return obj

    def _read(self, key: CacheEngineKey, meta: RemoteMetadata,
              obj: MemoryObj) -> Optional[MemoryObj]:
        """Fill ``obj`` (ref owned by the caller of this) from the file; ``obj`` or None."""
        try:
            problem = disk_files.read_into(self._file(key), obj, self.capacity_bytes,
                                           self.layout, expect=meta)
        except FileNotFoundError:
            problem = "vanished"
        except OSError as e:
            problem = f"unreadable ({e})"
        if problem is None and meta.fmt == MemoryFormat.BINARY and \
                compressed.is_stream(obj.byte_array):
            return self._decode(key, obj)
        if problem is None:
            self.stats["hits"] += 1
            return obj
        obj.ref_count_down()
        self.stats["misses"] += 1
        self._discard(key, problem)
        return None

    def _decode(self, key: CacheEngineKey, stream: MemoryObj) -> Optional[MemoryObj]:
        """The KV of a verified compressed file (codec from its own header) in new memory, or
        None: no memory (counted), or a foreign/newer/corrupt stream (a miss; deleted)."""
        try:
            obj = compressed.decode_stream(stream.byte_array, self.allocator_backend,
                                           self._decode_device)
        except ValueError as e:
            self.stats["misses"] += 1
            self._discard(key, f"undecodable ({e})")
            return None
        finally:
            stream.ref_count_down()
        if obj is None:
            self.stats["no_memory"] += 1
            return None
        self.stats["hits"] += 1
        return obj

    def batched_get_non_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Future]:
        """Futures of the chunks, read by the reader pool (each result as from get_blocking).

        The memory of each read is reserved now, in key order: when it runs out, futures are
        returned only for the chunks before (fewer futures than keys)."""
        futures: list[Future] = []
        for key in keys:
            found = self._lookup(key)
            if found is None or isinstance(found, MemoryObj):
                done: Future = Future()
                done.set_result(found)
                futures.append(done)
                continue
            obj = self._allocate(found)
            if obj is None:
                break
            futures.append(self._readers.submit(self._read, key, found, obj))
        return futures

    def batched_get_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        """Reads the chunks in parallel on the reader pool."""
        if len(keys) <= 1:
            return [self.get_blocking(k) for k in keys]
        out = [f.result() for f in self.batched_get_non_blocking(keys)]
        return out + [None] * (len(keys) - len(out))

    # ---- writes -------------------------------------------------------------------------
    def put(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        """Queue a write of ``obj`` (skipped when already stored, full, or backlogged)."""
        if self._closed:
            self.stats["dropped_closed"] += 1
            self._warn_once("closed", "disk tier is closed; chunk %s not written (further "
                            "ones only counted)", key)
            return
        try:
            meta = RemoteMetadata.for_tensor(obj.tensor, obj.fmt)
            self._file(key)
        except ValueError as e:
            self.stats["dropped_unwritable"] += 1
            self._warn_once("bad", "chunk %s not written to disk: %s", key, e)
            return
        size = FILE_HEADER_SIZE + meta.length
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
            self.chain.inserted(key)  # linked first: its parent is no victim of its room
            if not self._make_room(size):
                self.chain.remove(key)
                self.stats["dropped_capacity"] += 1
                self._warn_once("capacity", "disk tier cannot make room for %d bytes", size)
                return
            obj.ref_count_up()
            self._pending[key] = obj
            self.policy.on_put(key)  # in put order, not in the order writes finish
            self.used_bytes += size
            self._writing += 1
        self._writers.submit(self._write, key, obj, meta, size)

    def link_prefix(self, keys: Sequence[CacheEngineKey],
                    parent: Optional[CacheEngineKey] = None) -> None:
        with self._lock:
            written = {k: self.chain.parent(k) for k in keys if k in self._index}
            self.chain.link(keys, parent,
                            lambda k: k in self._index or k in self._pending)
            for key, old in written.items():  # (pending chunks: logged when written)
                if self.chain.parent(key) not in (None, old):
                    self._log_link(key)

    def _log_link(self, key: CacheEngineKey) -> None:
        """Persist the link of a written chunk (compacting the log when it grew far beyond the
        live links); caller holds the lock."""
        self.links.append(key, self.chain.parent(key))
        if self.links.lines > 2 * len(self._index) + 1024:
            self.links.rewrite(self.chain.links())

    def _write(self, key: CacheEngineKey, obj: MemoryObj, meta: RemoteMetadata, size: int):
        """Writer job: the file (temporary name, then rename) or its cleanup; counts down
        ``_writing`` only when nothing of it is left on disk (:meth:`flush` waits for that)."""
        try:
            self._write_file(key, obj, meta, size)
        finally:
            obj.ref_count_down()
            with self._lock:
                self._writing -= 1
                self._idle.notify_all()

    def _write_file(self, key: CacheEngineKey, obj: MemoryObj, meta: RemoteMetadata,
                    size: int) -> None:
        tmp = os.path.join(self.path, disk_files.tmp_name())
        try:
            payload = obj.byte_array
            if self.serde is not None:
                try:
                    meta, payload = self.serde.serialize(obj)
                except ValueError as e:  # (a refusal, like an unwritable chunk)
                    raise OSError(errno.EINVAL, f"local_disk_serde cannot encode it: {e}") from e
            disk_files.write_file(tmp, meta, payload, key.to_string(), self.layout)
            with self._lock:
                if self._pending.get(key) is obj:  # not removed/cleared meanwhile
                    os.replace(tmp, self._file(key))
                    del self._pending[key]
                    self._index[key] = meta
                    self._kv_event(KV_ADMIT, key)
                    self.used_bytes += FILE_HEADER_SIZE + meta.length - size  # encoded size
                    if self.chain.parent(key) is not None:
                        self._log_link(key)
                    self.stats["writes"] += 1
                    return
            os.unlink(tmp)
        except OSError as e:
            disk_files.unlink(tmp)  # before anyone can see the write as finished
            self._write_failed(key, obj, size, e)

    def _write_failed(self, key: CacheEngineKey, obj: MemoryObj, size: int, e: OSError) -> None:
        with self._lock:
            self.stats["write_errors"] += 1
            if self._pending.get(key) is obj:
                del self._pending[key]
                self.used_bytes -= size
                self.chain.remove(key)
                self.policy.on_remove(key)
        if not self._full_gate.trip(e):
            self._warn_once(f"errno{e.errno}", "disk write of %s failed: %s", key, e)

    def _make_room(self, size: int) -> bool:
        if size > self.capacity_bytes:
            return False
        if self.used_bytes + size <= self.capacity_bytes:
            return True
        for key in self.chain.victims(list(self.policy.victims(list(self._index)))):
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
            self.links.rewrite(())
            return len(keys)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every queued write has finished (or failed), its cleanup included (no
        temporary file of it is left); False on ``timeout`` (seconds; None = no limit)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._writing, timeout)

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
