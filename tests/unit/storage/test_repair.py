"""Issue 7.1 (tier side): an entry indexed but not servable is repaired.

A failed get (None, error, corrupt file) removes the entry from the tier that answered
``contains`` for it, ``contains`` never counts a chunk whose payload is gone, and the next store
writes it again so the next retrieve gets all of it. Real CPU and disk tiers, real files.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy

from storage_chunks import SHAPE, retrieve, value

DISK = "LocalDiskBackend"


def keys(n: int = 4) -> list[CacheEngineKey]:
    return [CacheEngineKey("m", 1, 0, 0x7100 + i, torch.bfloat16) for i in range(n)]


class PayloadLosingTier(LocalCPUBackend):
    """A real CPU tier that can lose a chunk's payload while keeping its index entry — what a
    Valkey with ``allkeys-lru`` does when it evicts ``<key>kv_bytes`` but keeps ``<key>metadata``
    — or fail its reads with an error."""

    name = "PayloadLosingTier"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.name = "PayloadLosingTier"
        self.lost: set[CacheEngineKey] = set()
        self.broken: set[CacheEngineKey] = set()

    def get_blocking(self, key):
        if key in self.broken:
            raise OSError(f"read of {key} failed")
        if key in self.lost:
            return None
        return super().get_blocking(key)

    def remove(self, key):
        self.lost.discard(key)
        self.broken.discard(key)
        return super().remove(key)


def store(sm: StorageManager, ks: list[CacheEngineKey], location=None) -> int:
    """As the engine stores: skip the cached prefix, store the rest; returns chunks stored."""
    where = None if location is None else [location]
    present = sm.contains_prefix(ks, retrieve_locations=where)
    objs = []
    for i in range(present, len(ks)):
        obj = sm.allocate(SHAPE, torch.bfloat16)
        obj.tensor.copy_(value(i))
        objs.append(obj)
    sm.batched_put(ks[present:], objs, store_location=location,
                   prefix_parent=ks[present - 1] if present else None)
    return len(objs)


@pytest.fixture
def allocator():
    a = CPUMemoryAllocator(1 << 20, pin_memory=False)
    yield a
    a.close()


@pytest.mark.parametrize("fault", ["lost", "broken"])
def test_lost_payload_is_repaired_and_stored_again(allocator, fault):
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
    tier = PayloadLosingTier(allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
    sm = StorageManager([tier], allocator_backend=cpu)  # no write-back: the tier alone serves
    ks = keys(4)
    try:
        assert store(sm, ks) == 4
        getattr(tier, fault).add(ks[1])
        assert sm.contains_prefix(ks) == 4        # indexed: promised in full once
        assert retrieve(sm, ks) == 1              # delivered: chunk 0 only
        assert sm.stats["repaired_entries"] == 1
        assert sm.contains_prefix(ks) == 1        # never promised again
        assert store(sm, ks) == 3                 # the next store writes it again
        assert retrieve(sm, ks) == 4              # ... and the next retrieve gets all
        assert sm.contains_prefix(ks) == 4
    finally:
        sm.close()
        cpu.close()


@pytest.fixture
def rig(tmp_path, allocator):
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
    disk = LocalDiskBackend(cpu, LRUCachePolicy(), local_disk=str(tmp_path / "disk"),
                            max_local_disk_size=1 / 1024)
    sm = StorageManager([cpu, disk])
    yield sm, cpu, disk, tmp_path
    sm.close()


def _flip_payload_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x20]))


def _garble_header(path):
    with open(path, "r+b") as f:
        f.write(b"NOTLMC!!")


def _truncate(path):
    os.truncate(path, os.path.getsize(path) - 512)


def _delete(path):
    os.unlink(path)


FAULTS = {"checksum": _flip_payload_byte, "garbled": _garble_header, "truncated": _truncate,
          "deleted": _delete}


@pytest.mark.parametrize("fault", sorted(FAULTS) + ["wrong_shape"])
def test_bad_disk_file_is_a_miss_then_repaired_then_stored_again(rig, fault):
    sm, cpu, disk, tmp_path = rig
    ks = keys(4)
    assert store(sm, ks, DISK) == 4 and disk.flush(timeout=60) and len(cpu) == 0
    path = disk._file(ks[2])
    if fault == "wrong_shape":  # a valid file of another shape (same byte size) under that name
        other = LocalDiskBackend(cpu, LRUCachePolicy(), local_disk=str(tmp_path / "other"),
                                 max_local_disk_size=1 / 1024)
        obj = cpu.allocate((2, 2, 32, 16), torch.bfloat16)
        obj.tensor.copy_(value(2).view(2, 2, 32, 16))
        other.put(ks[2], obj)
        obj.ref_count_down()
        assert other.flush(timeout=60)
        shutil.copyfile(other._file(ks[2]), path)
        other.close()
    else:
        FAULTS[fault](path)
    promised = sm.contains_prefix(ks)
    # a file that is gone or short is never promised; one whose bytes lie is, once
    assert promised == (2 if fault in ("deleted", "truncated") else 4)
    assert retrieve(sm, ks) == 2
    assert not disk.contains(ks[2]) and not os.path.exists(path)
    assert sm.contains_prefix(ks) == 2
    assert disk.stats["corrupt"] + disk.stats["vanished"] == 1
    cpu.clear()  # the CPU copies of chunks 0-1 (write-back) do not matter here
    assert store(sm, ks, DISK) == 2 and disk.flush(timeout=60)
    assert sm.contains_prefix(ks) == 4
    cpu.clear()
    assert retrieve(sm, ks) == 4


def test_disk_read_without_memory_is_no_miss_and_not_repaired(rig):
    sm, cpu, disk, _ = rig
    ks = keys(2)
    assert store(sm, ks, DISK) == 2 and disk.flush(timeout=60)
    hog = []
    while (obj := cpu.allocate(SHAPE, torch.bfloat16)) is not None:
        hog.append(obj)  # the CPU tier's memory is all in use
    try:
        assert sm.contains_prefix(ks) == 2
        assert retrieve(sm, ks) == 0
        assert disk.stats["no_memory"] >= 1 and disk.stats["misses"] == 0
        assert sm.stats["repaired_entries"] == 0 and sm.contains_prefix(ks) == 2
    finally:
        for obj in hog:
            obj.ref_count_down()
    assert retrieve(sm, ks) == 2


def test_cpu_entry_with_freed_memory_is_never_promised(allocator):
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
    sm = StorageManager([cpu])
    ks = keys(2)
    store(sm, ks)
    cpu.hot_cache[ks[1]].ref_count_down()  # someone's extra release frees the tier's object
    assert sm.contains_prefix(ks) == 1 and cpu.num_repaired == 1
    assert store(sm, ks) == 1 and retrieve(sm, ks) == 2
    sm.close()
