"""DiskWrites: the write path of the LocalDiskBackend (queued puts, the writer jobs, room by
eviction, prefix links; see :class:`~lmcache.storage.backends.local_disk.LocalDiskBackend` for
the contract)."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Optional

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_obj import MemoryObj
from lmcache.serde.wire.chunk_file import FILE_HEADER_SIZE
from lmcache.serde.wire.remote_metadata import RemoteMetadata
from lmcache.storage.backends import disk_files
from lmcache.storage.backends.base import KV_ADMIT


class DiskWrites:
    """The puts of :class:`~lmcache.storage.backends.local_disk.LocalDiskBackend` (its base
    class; they use its lock, index, pending writes, pins, prefix chain, link log, policy,
    full-disk gate, writer pool ``_writers``, ``used_bytes``, ``stats``, ``_file``,
    ``_remove_locked``, ``_kv_event`` and ``_warn_once``)."""

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

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every queued write has finished (or failed), its cleanup included (no
        temporary file of it is left); False on ``timeout`` (seconds; None = no limit)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._writing, timeout)
