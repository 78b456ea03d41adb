"""KV events of the tiers (add_kv_listener): what the LMCacheWorker reports to the controller."""

import time

import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory import CPUMemoryAllocator, MemoryFormat
from lmcache.storage.backends.base import KV_ADMIT, KV_EVICT
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.policy.lru import LRUCachePolicy

SHAPE = (2, 1, 4, 8)  # 256 bytes of float32


def key(i):
    return CacheEngineKey("m", 1, 0, i, torch.float32)


def put(be, alloc_be, i):
    obj = alloc_be.allocate(SHAPE, torch.float32, MemoryFormat.KV_2LTD)
    obj.tensor.fill_(float(i))
    be.put(key(i), obj)
    obj.ref_count_down()


def test_cpu_tier_reports_admit_replace_evict_remove_clear():
    alloc = CPUMemoryAllocator(4 * 256, alignment=256)
    be = LocalCPUBackend(alloc, LRUCachePolicy(), max_local_cpu_size=1.0)
    events = []
    be.add_kv_listener(lambda tier, op, k: events.append((tier, op, k.chunk_hash)))
    for i in range(3):
        put(be, be, i)
    put(be, be, 1)  # replacing an object under a held key is no new admit
    assert events == [("LocalCPUBackend", KV_ADMIT, i) for i in range(3)]
    put(be, be, 3)
    put(be, be, 4)  # allocator full: evicts the least recently used (0)
    assert events[3:] == [("LocalCPUBackend", KV_ADMIT, 3), ("LocalCPUBackend", KV_EVICT, 0),
                          ("LocalCPUBackend", KV_ADMIT, 4)]
    assert be.remove(key(2)) and events[-1] == ("LocalCPUBackend", KV_EVICT, 2)
    assert be.clear() == 3
    assert sorted(events[-3:]) == [("LocalCPUBackend", KV_EVICT, i) for i in (1, 3, 4)]
    be.close()
    alloc.close()


def test_failing_listener_never_fails_the_tier():
    alloc = CPUMemoryAllocator(2 * 256, alignment=256)
    be = LocalCPUBackend(alloc, LRUCachePolicy(), max_local_cpu_size=1.0)
    be.add_kv_listener(lambda *a: 1 / 0)
    put(be, be, 7)
    assert be.contains(key(7))
    be.close()
    alloc.close()


def test_disk_tier_reports_written_and_removed_files(tmp_path):
    alloc = CPUMemoryAllocator(4 * 256, alignment=256)
    cpu = LocalCPUBackend(alloc, LRUCachePolicy(), max_local_cpu_size=1.0)
    disk = LocalDiskBackend(cpu, LRUCachePolicy(), str(tmp_path), max_local_disk_size=0.01)
    events = []
    disk.add_kv_listener(lambda tier, op, k: events.append((tier, op, k.chunk_hash)))
    put(disk, cpu, 5)
    assert disk.flush(timeout=10)
    assert events == [("LocalDiskBackend", KV_ADMIT, 5)] and disk.keys() == [key(5)]
    assert disk.remove(key(5))
    assert events[-1] == ("LocalDiskBackend", KV_EVICT, 5) and disk.keys() == []
    disk.close()
    cpu.close()
    alloc.close()
