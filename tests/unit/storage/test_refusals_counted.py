"""Issue 7.4 (tier side): every path where the CPU or disk tier or the StorageManager refuses a
chunk increments a named counter and logs once. Issue 7.12: flush() waits for every write's
cleanup. Real tiers, real files, real threads."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.wire.chunk_file import FILE_HEADER_SIZE
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy

SHAPE = (2, 2, 16, 32)  # bf16, 4096 bytes


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("m", 1, 0, 0x7400 + i, torch.bfloat16)


def logs(caplog, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


@pytest.fixture
def allocator():
    a = CPUMemoryAllocator(1 << 20, pin_memory=False)
    yield a
    a.close()


def test_cpu_tier_refusals_are_counted_and_logged_once(allocator, caplog):
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=2 * 4096 / 2**30)
    objs = [allocator.allocate(SHAPE, torch.bfloat16) for _ in range(5)]
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        for i, obj in enumerate(objs):
            cpu.put(key(i), obj)  # the producer still holds each: nothing is evictable
    assert len(cpu) == 2 and cpu.num_rejected_puts == 3
    assert logs(caplog, "LocalCPUBackend full") == 1
    for obj in objs:
        obj.ref_count_down()
    assert cpu.allocate(SHAPE, torch.bfloat16, evict=False) is None
    assert cpu.num_failed_allocations == 1
    cpu.close()


def test_disk_tier_refusals_are_counted_and_logged_once(allocator, tmp_path, caplog):
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
    file_size = FILE_HEADER_SIZE + 4096
    disk = LocalDiskBackend(cpu, LRUCachePolicy(), local_disk=str(tmp_path),
                            max_local_disk_size=1.5 * file_size / 2**30)
    obj = cpu.allocate(SHAPE, torch.bfloat16)
    big = cpu.allocate((2, 2, 32, 32), torch.bfloat16)
    odd = cpu.allocate((1, 2, 2, 16, 32), torch.bfloat16)  # 5 dims: no wire header for it
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        for i in range(2):
            disk.put(key(100 + i), big)     # larger than the whole tier
            disk.put(key(200 + i), odd)
        disk.put(key(0), obj)
        assert disk.flush(timeout=60)
        assert disk.contains(key(0), pin=True)
        disk.put(key(1), obj)               # no room: key(0) is pinned
        disk.unpin(key(0))
        disk.close()
        for i in range(2):
            disk.put(key(300 + i), obj)     # closed
    assert disk.stats["dropped_capacity"] == 3
    assert disk.stats["dropped_unwritable"] == 2
    assert disk.stats["dropped_closed"] == 2
    assert logs(caplog, "cannot make room") == 1
    assert logs(caplog, "not written to disk") == 1
    assert logs(caplog, "disk tier is closed") == 1
    for o in (obj, big, odd):
        o.ref_count_down()
    cpu.close()


class BrokenDisk(LocalDiskBackend):
    """A real disk tier whose device fails every write at once."""

    def put(self, key, obj):
        raise OSError(5, "Input/output error")


def test_manager_counts_a_failing_tier_and_logs_once(allocator, tmp_path, caplog):
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
    disk = BrokenDisk(cpu, LRUCachePolicy(), local_disk=str(tmp_path),
                      max_local_disk_size=1 / 1024)
    sm = StorageManager([cpu, disk])
    with caplog.at_level(logging.ERROR, logger="lmcache"):
        for i in range(3):
            obj = sm.allocate(SHAPE, torch.bfloat16)
            sm.batched_put([key(i)], [obj])
    assert sm.num_tier_errors == 3 and logs(caplog, "failed in batched_put") == 1
    assert len(cpu) == 3  # the other tier kept working
    sm.close()


def test_flush_returns_only_after_every_write_is_cleaned_up(allocator, tmp_path):
    """A write whose chunk is removed meanwhile deletes its temporary file; flush() must not
    return before that (it returned once the chunk left the pending set)."""
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
    disk = LocalDiskBackend(cpu, LRUCachePolicy(), local_disk=str(tmp_path),
                            max_local_disk_size=1 / 1024, num_writers=2)
    obj = cpu.allocate((64, 1024), torch.uint8, MemoryFormat.BINARY)  # 64 KiB writes
    obj.tensor.fill_(7)
    try:
        for i in range(30):
            disk.put(key(i), obj)
            disk.remove(key(i))  # while its write runs
            assert disk.flush(timeout=60)
            assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")], i
        assert len(disk) == 0 and disk.used_bytes == 0
    finally:
        obj.ref_count_down()
        disk.close()
        cpu.close()
