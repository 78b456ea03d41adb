"""DiskReads: the read path of the LocalDiskBackend (gets, prefetch futures, decoding of
compressed files; see :class:`~lmcache.storage.backends.local_disk.LocalDiskBackend` for the
contract)."""

from __future__ import annotations

from concurrent.futures import Future
from collections.abc import Sequence
from typing import Optional, Union

import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.serde import compressed
from lmcache.serde.wire.remote_metadata import RemoteMetadata
from lmcache.storage.backends import disk_files


class DiskReads:
    """The gets of :class:`~lmcache.storage.backends.local_disk.LocalDiskBackend` (its base
    class; they use its lock, index, pending writes, policy, allocator_backend, layout, reader
    pool ``_readers``, ``stats``, ``_file``, ``_discard`` and ``_warn_once``)."""

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
