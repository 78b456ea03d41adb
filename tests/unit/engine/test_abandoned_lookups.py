"""Issue 7.7: abandoned work leaves nothing pinned; issue 7.1 through the engine.

Real threads, a real slow tier (a disk tier whose lookups wait on a gate, as a hung remote
does), real files. A lookup the scheduler gave up on releases what it pinned and prefetched
however late it finishes; pins nobody releases are bounded by a lease; a prefetch dropped just
as it arrives never touches freed memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

C, L, H, D, N, BLOCKS = 4, 2, 2, 8, 4, 16  # chunk, layers, heads, head size, block, blocks
DTYPE = torch.bfloat16
DISK = "LocalDiskBackend"
TOKENS = torch.randint(0, 50000, (12,), generator=torch.Generator().manual_seed(7))


class SlowDisk(LocalDiskBackend):
    """A real disk tier whose lookups wait for ``gate`` while ``slow`` is set (a hung tier)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.slow = False

    def batched_contains(self, keys, pin=False):
        if self.slow:
            self.entered.set()
            assert self.gate.wait(30)
        return super().batched_contains(keys, pin=pin)


class Rig:
    def __init__(self, tmp_path, pin_lease_secs=600.0):
        self.meta = LMCacheMetadata("org/model", 1, 0, DTYPE, (L, 2, C, H, D))
        self.layout = KVCacheLayout("cpu_packed", N, H, D)
        self.allocator = CPUMemoryAllocator(1 << 20, pin_memory=False)
        self.cpu = LocalCPUBackend(self.allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
        self.disk = SlowDisk(self.cpu, LRUCachePolicy(), local_disk=str(tmp_path),
                             max_local_disk_size=1 / 1024)
        self.sm = StorageManager([self.cpu, self.disk])
        self.engine = LMCacheEngine(self.meta, ChunkedTokenDatabase(self.meta, C),
                                    VLLMPagedMemGPUConnectorV2(self.meta, self.layout), self.sm,
                                    pin_lease_secs=pin_lease_secs)

    def cache(self, seed=None):
        shape = (BLOCKS, H, N, 2 * D)
        if seed is None:
            return [torch.full(shape, -3.0, dtype=DTYPE) for _ in range(L)]
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(shape, generator=gen).to(DTYPE) for _ in range(L)]

    def store(self, location=None, mask=None):
        src, src_slots = self.cache(1), slots(12, 1)
        n = self.engine.store(TOKENS, mask, kvcaches=src, slot_mapping=src_slots,
                              store_location=location)
        assert self.disk.flush(timeout=60)
        return n, gather_kv(src, src_slots, self.layout)

    def retrieve(self, **kw):
        dst, dst_slots = self.cache(), slots(12, 2)
        ret = self.engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=dst_slots, **kw)
        return int(ret.sum()), gather_kv(dst, dst_slots, self.layout)

    def pinned(self) -> int:
        return (sum(o.get_pin_count() for o in self.cpu.hot_cache.values())
                + sum(self.disk._pins.values()))

    def close(self):
        self.disk.gate.set()
        self.engine.close()
        self.allocator.close()


def slots(n, seed):
    return torch.randperm(BLOCKS * N - N, generator=torch.Generator().manual_seed(seed))[:n] + N


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_lookup_abandoned_while_a_tier_hangs_releases_everything_when_it_ends(rig):
    rig.store(DISK)                      # chunks 0-2 on disk
    rig.store("LocalCPUBackend")         # ... and in the CPU tier
    rig.cpu.remove(rig.cpu.keys()[-1])   # chunk 2 only on disk: the lookup asks the disk
    rig.disk.slow = True
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault(
        "hit", rig.engine.lookup(TOKENS, pin=True, lookup_id="req-1")))
    worker.start()
    assert rig.disk.entered.wait(30)     # the CPU chunks are pinned; the disk hangs
    assert rig.pinned() == 2
    rig.engine.lookup_unpin("req-1")     # the scheduler gave up; the request ended
    rig.disk.gate.set()
    worker.join(30)
    assert not worker.is_alive() and result["hit"] == 0
    assert rig.pinned() == 0 and rig.sm.num_prefetches == 0
    assert rig.engine.counters["abandoned_lookups"] == 1
    assert rig.engine.stats.value("pinned_lookups") == 0
    # the CPU tier can evict everything again: nothing is held for the dead request
    assert rig.disk.flush(timeout=60)
    deadline = time.monotonic() + 10
    while rig.allocator.num_active_allocations != len(rig.cpu) and time.monotonic() < deadline:
        time.sleep(0.01)  # (a prefetch read still arriving is released when it lands)
    assert rig.allocator.num_active_allocations == len(rig.cpu)


def test_unreleased_pins_expire_with_their_lease(tmp_path):
    r = Rig(tmp_path, pin_lease_secs=0.2)
    try:
        r.store()
        assert r.engine.lookup(TOKENS, pin=True, lookup_id="lost") == 12
        assert r.pinned() == 3
        time.sleep(0.3)
        assert r.engine.lookup(TOKENS[:4], pin=True, lookup_id="next") == 4
        assert r.engine.counters["expired_pin_leases"] == 1
        assert r.pinned() == 1  # only the live request's chunk
        r.engine.lookup_unpin("next")
        assert r.pinned() == 0
    finally:
        r.close()


def test_pin_lease_must_be_positive(tmp_path):
    r = Rig(tmp_path)
    try:
        with pytest.raises(ValueError, match="pin_lease_secs"):
            LMCacheEngine(r.meta, ChunkedTokenDatabase(r.meta, C),
                          VLLMPagedMemGPUConnectorV2(r.meta, r.layout), r.sm, pin_lease_secs=0)
    finally:
        r.close()


def test_prefetch_dropped_as_it_arrives_never_touches_freed_memory(rig, caplog):
    rig.store(DISK)
    with caplog.at_level(logging.ERROR, logger="lmcache"):
        for i in range(60):
            rig.cpu.clear()  # so every lookup prefetches from the disk again
            assert rig.engine.lookup(TOKENS, pin=True, lookup_id=f"r{i}") == 12
            if i % 2:
                time.sleep(0.001 * (i % 5))  # drop it before, during and after arrival
            rig.engine.lookup_unpin(f"r{i}")
        assert rig.disk.flush(timeout=60)
    assert rig.sm.num_tier_errors == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert rig.pinned() == 0 and rig.sm.num_prefetches == 0


def test_corrupt_disk_chunk_costs_one_retrieve_then_is_stored_again(rig):
    """7.1 through the engine: promised 12, delivered 4, then stored again and all 12 come."""
    n, want = rig.store(DISK)
    assert n == 12
    keys = [k for _, _, k in rig.engine.token_database.process_tokens(TOKENS)]
    path = rig.disk._file(keys[1])
    with open(path, "r+b") as f:
        f.seek(-7, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    assert rig.engine.lookup(TOKENS) == 12
    got, _ = rig.retrieve(retrieve_locations=[DISK])
    assert got == 4
    assert rig.engine.lookup(TOKENS, retrieve_locations=[DISK]) == 4
    n, _ = rig.store(DISK)
    assert n == 8
    rig.cpu.clear()
    got, kv = rig.retrieve()
    assert got == 12 and torch.equal(kv, want)
