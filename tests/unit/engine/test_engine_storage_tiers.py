"""LMCacheEngine with a CPU and a disk tier (real files): ``store_location``,
``retrieve_locations`` and the lookup prefetch that a retrieve with the same lookup_id uses."""

from __future__ import annotations

import time

import pytest
import torch

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_layerwise import VLLMPagedMemLayerwiseGPUConnector
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.event_manager import EventStatus, EventType
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

C, L, H, D, N, BLOCKS = 4, 2, 2, 8, 4, 16  # chunk, layers, heads, head size, block, blocks
DTYPE = torch.bfloat16
CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"


class Rig:
    def __init__(self, tmp_path, layerwise=False):
        self.meta = LMCacheMetadata("org/model", 1, 0, DTYPE, (L, 2, C, H, D))
        self.layout = KVCacheLayout("cpu_packed", N, H, D)
        self.allocator = CPUMemoryAllocator(1 << 20, pin_memory=False)
        self.cpu = LocalCPUBackend(self.allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
        self.disk = LocalDiskBackend(self.cpu, LRUCachePolicy(), local_disk=str(tmp_path),
                                     max_local_disk_size=1 / 1024)
        self.sm = StorageManager([self.cpu, self.disk])
        conn = (VLLMPagedMemLayerwiseGPUConnector(self.meta, self.layout, backend="torch")
                if layerwise else VLLMPagedMemGPUConnectorV2(self.meta, self.layout))
        self.engine = LMCacheEngine(self.meta, ChunkedTokenDatabase(self.meta, C), conn, self.sm)

    def cache(self, seed=None):
        shape = (BLOCKS, H, N, 2 * D)
        if seed is None:
            return [torch.full(shape, -3.0, dtype=DTYPE) for _ in range(L)]
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(shape, generator=gen).to(DTYPE) for _ in range(L)]

    def close(self):
        self.engine.close()
        self.allocator.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def slots(n, seed):
    return torch.randperm(BLOCKS * N - N, generator=torch.Generator().manual_seed(seed))[:n] + N


TOKENS = torch.randint(0, 50000, (12,), generator=torch.Generator().manual_seed(0))


def store_on_disk(rig):
    src, src_slots = rig.cache(1), slots(12, 1)
    assert rig.engine.store(TOKENS, kvcaches=src, slot_mapping=src_slots,
                            store_location=DISK) == 12
    assert rig.disk.flush(timeout=60)
    assert len(rig.cpu) == 0 and len(rig.disk) == 3
    return gather_kv(src, src_slots, rig.layout)


def test_store_location_and_retrieve_locations(rig):
    want = store_on_disk(rig)
    # the store skips only chunks that its location already has
    assert rig.engine.store(TOKENS, kvcaches=rig.cache(1), slot_mapping=slots(12, 1),
                            store_location=DISK) == 0
    assert rig.engine.lookup(TOKENS, retrieve_locations=[CPU]) == 0
    assert rig.engine.lookup(TOKENS, retrieve_locations=[DISK]) == 12
    dst, dst_slots = rig.cache(), slots(12, 2)
    ret = rig.engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=dst_slots,
                              retrieve_locations=[CPU])
    assert not ret.any()
    ret = rig.engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=dst_slots,
                              retrieve_locations=[DISK])
    assert ret.all() and torch.equal(gather_kv(dst, dst_slots, rig.layout), want)
    assert rig.engine.lookup(TOKENS, retrieve_locations=[CPU]) == 12  # written back
    with pytest.raises(ValueError, match=r"unknown tier\(s\) \['S3'\]"):
        rig.engine.store(TOKENS, kvcaches=dst, slot_mapping=dst_slots, store_location="S3")
    with pytest.raises(ValueError, match=r"unknown tier\(s\) \['S3'\]"):
        rig.engine.lookup(TOKENS, retrieve_locations=["S3"])


def test_retrieve_uses_the_prefetch_of_its_lookup(rig):
    want = store_on_disk(rig)
    assert rig.engine.lookup(TOKENS, pin=True, lookup_id="req-1") == 12
    assert rig.sm.num_prefetches == 1
    keys = [k for _, _, k in rig.engine.token_database.process_tokens(TOKENS)]
    for _ in range(400):  # until the background reads are done (bounded)
        done = all(rig.sm.event_manager.get_event_status(EventType.LOADING, ("req-1", k))
                   == EventStatus.DONE for k in keys)
        if done:
            break
        time.sleep(0.025)
    assert done
    assert len(rig.cpu) == 3  # written back on arrival
    rig.cpu.clear()
    rig.disk.clear()  # gone from every tier after the lookup: the prefetch still delivers
    dst, dst_slots = rig.cache(), slots(12, 3)
    ret = rig.engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=dst_slots, lookup_id="req-1")
    assert ret.all() and torch.equal(gather_kv(dst, dst_slots, rig.layout), want)
    assert rig.sm.stats["prefetch_hits"] == 3 and rig.sm.num_prefetches == 0
    assert len(rig.cpu) == 3 and rig.engine.lookup(TOKENS) == 12


def test_lookup_unpin_releases_an_unused_prefetch(rig):
    store_on_disk(rig)
    assert rig.engine.lookup(TOKENS, pin=True, lookup_id="req-2") == 12
    assert rig.sm.num_prefetches == 1
    rig.engine.lookup_unpin("req-2")
    assert rig.sm.num_prefetches == 0 and not rig.disk._pins
    rig.disk.close()  # waits for the reads in flight (a read not yet started may be dropped)
    # what arrived was written back into the CPU tier, which alone holds it now (evictable);
    # nothing else stays allocated
    assert rig.allocator.num_active_allocations == len(rig.cpu) <= 3
    assert all(o.can_evict for o in rig.cpu.hot_cache.values())


def test_locations_on_the_layerwise_path_are_rejected(tmp_path):
    r = Rig(tmp_path, layerwise=True)
    try:
        with pytest.raises(ValueError, match="not supported with a layerwise gpu_connector"):
            r.engine.lookup(TOKENS, retrieve_locations=[DISK])
        with pytest.raises(ValueError, match="store_location='LocalDiskBackend'"):
            r.engine.store(TOKENS, kvcaches=r.cache(1), slot_mapping=slots(12, 1),
                           store_location=DISK)
    finally:
        r.close()
