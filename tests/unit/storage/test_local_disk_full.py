"""A full disk (a real, tiny tmpfs) stops admissions to the disk tier and logs once."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.policy.lru import LRUCachePolicy

SHAPE = (2, 2, 64, 128)  # bf16: 64 KiB per chunk


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (needs root, as on the developer and CI machines)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_stops_admissions_logs_once_and_recovers(tiny_fs, caplog):
    allocator = CPUMemoryAllocator(8 << 20, pin_memory=False)
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=8 / 1024)
    disk = LocalDiskBackend(cpu, LRUCachePolicy(), local_disk=str(tiny_fs),
                            max_local_disk_size=1.0, num_writers=1, disk_full_retry_secs=0)
    keys = [CacheEngineKey("m", 1, 0, i, torch.bfloat16) for i in range(12)]
    try:
        with caplog.at_level(logging.WARNING, logger="lmcache"):
            for i, k in enumerate(keys):
                obj = cpu.allocate(SHAPE, torch.bfloat16, MemoryFormat.KV_2LTD)
                obj.tensor.fill_(i)
                disk.put(k, obj)
                cpu.put(k, obj)            # the CPU tier keeps working beside it
                obj.ref_count_down()
                assert disk.flush(timeout=60)
        stored = [disk.contains(k) for k in keys]
        n = sum(stored)
        assert 1 <= n < len(keys) and stored == [True] * n + [False] * (len(keys) - n)
        full_logs = [r for r in caplog.records if "is full" in r.getMessage()]
        assert len(full_logs) == 1
        assert disk.stats["write_errors"] == 1
        assert disk.stats["dropped_disk_full"] == len(keys) - n - 1
        assert not [f for f in os.listdir(tiny_fs) if f.startswith(".tmp-")]
        for i in range(n):                 # what was written is intact
            obj = disk.get_blocking(keys[i])
            assert obj is not None and bool((obj.tensor == i).all())
            obj.ref_count_down()
        assert all(cpu.contains(k) for k in keys)

        for k in keys[:3]:                 # free space: admissions resume
            disk.remove(k)
        obj = cpu.get_blocking(keys[-1])
        disk.put(keys[-1], obj)
        obj.ref_count_down()
        assert disk.flush(timeout=60)
        assert disk.contains(keys[-1])
        got = disk.get_blocking(keys[-1])
        assert bool((got.tensor == len(keys) - 1).all())
        got.ref_count_down()
    finally:
        disk.close()
        cpu.close()
        allocator.close()
