"""Issue 7.2: a lookup promises only what retrieve can deliver.

Pinned chunks stay servable until their load ran or the request ended; a prefetch reserves the
memory it needs at lookup time, or the promise shrinks to what it could reserve, and "no memory"
is counted apart from misses (``prefetch_no_memory``, the disk tier's ``no_memory``).
"""

from __future__ import annotations

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy

from storage_chunks import CHUNK, SHAPE, retrieve, value

DISK = "LocalDiskBackend"


def keys(n: int) -> list[CacheEngineKey]:
    return [CacheEngineKey("m", 1, 0, 0x7200 + i, torch.bfloat16) for i in range(n)]


@pytest.fixture
def rig(tmp_path):
    allocator = CPUMemoryAllocator(8 * CHUNK, pin_memory=False)  # room for 8 chunks
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=8 * CHUNK / 2**30)
    disk = LocalDiskBackend(cpu, LRUCachePolicy(), local_disk=str(tmp_path),
                            max_local_disk_size=1 / 1024)
    sm = StorageManager([cpu, disk])
    yield sm, cpu, disk
    sm.close()
    allocator.close()


def put(sm: StorageManager, ks, location=None) -> None:
    objs = []
    for i, _ in enumerate(ks):
        obj = sm.allocate(SHAPE, torch.bfloat16)
        obj.tensor.copy_(value(i))
        objs.append(obj)
    sm.batched_put(ks, objs, store_location=location)


def hog(cpu: LocalCPUBackend, n: int) -> list:
    """Take ``n`` chunks of memory that nothing can evict (a running store's buffers)."""
    objs = [cpu.allocate(SHAPE, torch.bfloat16) for _ in range(n)]
    assert all(o is not None for o in objs)
    return objs


def test_prefetch_promises_only_the_chunks_it_reserved_memory_for(rig):
    sm, cpu, disk = rig
    ks = keys(4)
    put(sm, ks, DISK)
    assert disk.flush(timeout=60) and len(cpu) == 0
    held = hog(cpu, 6)  # 2 chunks of memory left
    try:
        # Before: 4 promised, the reads found memory for 2, the rest counted as misses.
        assert sm.contains_prefix(ks, pin=True, lookup_id="r1") == 2
        assert sm.stats["prefetch_no_memory"] == 2 and sm.stats["prefetch_chunks"] == 2
        assert cpu.allocate(SHAPE, torch.bfloat16) is None  # the reservation holds
        assert retrieve(sm, ks, lookup_id="r1") == 2        # every promised chunk arrives
        assert sm.stats["prefetch_hits"] == 2 and sm.stats["prefetch_misses"] == 0
        assert disk.stats["misses"] == 0
    finally:
        sm.unpin(ks[:2])
        for obj in held:
            obj.ref_count_down()


def test_pinned_cpu_chunks_stay_servable_under_memory_pressure(rig):
    sm, cpu, _ = rig
    ks = keys(4)
    put(sm, ks, "LocalCPUBackend")
    assert sm.contains_prefix(ks, pin=True) == 4
    got = [cpu.allocate(SHAPE, torch.bfloat16) for _ in range(6)]  # a store wants 6 chunks
    assert sum(o is not None for o in got) == 4 and len(cpu) == 4  # nothing pinned evicted
    for obj in got:
        if obj is not None:
            obj.ref_count_down()
    assert retrieve(sm, ks) == 4
    sm.unpin(ks)  # the request ended: now evictable
    more = hog(cpu, 8)
    assert len(cpu) == 0
    for obj in more:
        obj.ref_count_down()


def test_disk_prefetch_reserves_at_lookup_not_at_read(rig):
    sm, cpu, disk = rig
    ks = keys(3)
    put(sm, ks, DISK)
    assert disk.flush(timeout=60)
    assert sm.contains_prefix(ks, pin=True, lookup_id="r2") == 3
    held = []
    while (obj := cpu.allocate(SHAPE, torch.bfloat16)) is not None:
        held.append(obj)  # memory runs out after the lookup
    try:
        assert retrieve(sm, ks, lookup_id="r2") == 3
        assert disk.stats["no_memory"] == 0
    finally:
        sm.unpin(ks)
        for obj in held:
            obj.ref_count_down()


def test_unpin_releases_the_pin_in_the_tier_that_took_it(rig):
    """A chunk pinned in the disk tier stays pinned there until its own unpin, even when a
    CPU copy of it (written back meanwhile) is pinned by another request."""
    sm, cpu, disk = rig
    ks = keys(2)
    put(sm, ks, DISK)
    assert disk.flush(timeout=60)
    assert sm.contains_prefix(ks, pin=True) == 2          # request A: pins on disk
    assert retrieve(sm, ks) == 2                           # written back into the CPU tier
    assert sm.contains_prefix(ks, pin=True) == 2          # request B: pins the CPU copies
    sm.unpin(ks)                                           # A ends
    assert disk._pins == {} and [cpu.hot_cache[k].get_pin_count() for k in ks] == [1, 1]
    sm.unpin(ks)                                           # B ends
    assert [cpu.hot_cache[k].get_pin_count() for k in ks] == [0, 0]


def test_replacing_a_pinned_object_moves_its_pins_once(rig):
    """X pinned, replaced by Y (pins move), X put back (it was still alive, e.g. a disk tier's
    pending write): the pins count once, not twice."""
    sm, cpu, _ = rig
    k = keys(1)[0]
    x, y = hog(cpu, 2)
    cpu.put(k, x)
    assert cpu.contains(k, pin=True)
    cpu.put(k, y)
    assert (x.get_pin_count(), y.get_pin_count()) == (0, 1)
    cpu.put(k, x)
    assert (x.get_pin_count(), y.get_pin_count()) == (1, 0)
    assert cpu.unpin(k) and x.get_pin_count() == 0
    for obj in (x, y):
        obj.ref_count_down()
