import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory import CPUMemoryAllocator, MemoryFormat
from lmcache.storage.backends import LocalCPUBackend, StorageBackendInterface
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy import LRUCachePolicy

SHAPE = (2, 2, 4, 8)  # KV_2LTD, float16: 256 bytes


def key(i):
    return CacheEngineKey("org/model", 1, 0, 1000 + i, torch.float16)


class BrokenTier(StorageBackendInterface):
    """A tier whose storage is down: every call raises (fault injection)."""

    name = "Broken"

    def contains(self, key, pin=False):
        raise OSError("down")

    def put(self, key, obj):
        raise OSError("down")

    def get_blocking(self, key):
        raise OSError("down")

    def unpin(self, key):
        raise OSError("down")

    def remove(self, key):
        raise OSError("down")

    def clear(self):
        raise OSError("down")

    def close(self):
        raise OSError("down")


@pytest.fixture
def tiers():
    a1 = CPUMemoryAllocator(8 * 256, alignment=256)
    a2 = CPUMemoryAllocator(8 * 256, alignment=256)
    cpu = LocalCPUBackend(a1, LRUCachePolicy(), max_local_cpu_size=1.0)
    lower = LocalCPUBackend(a2, LRUCachePolicy(), max_local_cpu_size=1.0)
    lower.name = "LowerTier"
    yield cpu, lower
    cpu.close()
    lower.close()
    a1.close()
    a2.close()


def make(backend, i):
    obj = backend.allocate(SHAPE, torch.float16, MemoryFormat.KV_2LTD)
    obj.tensor.copy_(torch.full(SHAPE, float(i), dtype=torch.float16))
    return obj


def put_direct(backend, i):
    obj = make(backend, i)
    backend.put(key(i), obj)
    obj.ref_count_down()


def test_batched_put_every_tier_and_drops_producer_ref(tiers):
    cpu, lower = tiers
    sm = StorageManager([cpu, lower], allocator_backend=cpu)
    objs = [sm.allocate(SHAPE, torch.float16) for _ in range(3)]
    for i, o in enumerate(objs):
        o.tensor.fill_(float(i))
    sm.batched_put([key(i) for i in range(3)], objs)
    assert [o.get_ref_count() for o in objs] == [2, 2, 2]  # one per tier
    assert cpu.keys() == lower.keys() == [key(i) for i in range(3)]
    assert sm.contains_prefix([key(i) for i in range(4)]) == 3
    with pytest.raises(ValueError, match="2 keys but 1"):
        sm.batched_put([key(0), key(1)], objs[:1])


def test_producer_ref_dropped_even_with_no_tier():
    alloc = CPUMemoryAllocator(1024)
    cpu = LocalCPUBackend(alloc, LRUCachePolicy())
    sm = StorageManager([], allocator_backend=cpu)
    obj = sm.allocate((4,), torch.float32)
    sm.batched_put([key(0)], [obj])
    assert not obj.is_valid and alloc.used_bytes == 0


def test_prefix_over_tiers_block_mapping_and_pins(tiers):
    cpu, lower = tiers
    put_direct(cpu, 0)
    put_direct(cpu, 1)
    put_direct(lower, 2)
    put_direct(lower, 3)
    put_direct(cpu, 5)  # after the miss at 4: not part of the prefix
    sm = StorageManager([cpu, lower])
    assert sm.allocator_backend is cpu
    keys = [key(i) for i in range(6)]
    assert sm.get_block_mapping(keys) == {"LocalCPUBackend": [0, 1], "LowerTier": [2, 3]}
    assert sm.contains_prefix(keys, pin=True) == 4
    assert [cpu.hot_cache[key(i)].get_pin_count() for i in (0, 1, 5)] == [1, 1, 0]
    assert [lower.hot_cache[key(i)].get_pin_count() for i in (2, 3)] == [1, 1]
    sm.unpin(keys)
    assert all(not o.is_pinned for o in list(cpu.hot_cache.values()) +
               list(lower.hot_cache.values()))
    assert sm.contains_prefix([key(4)] + keys) == 0 and sm.get_block_mapping([key(4)]) == {}


def test_batched_get_first_tier_stops_at_miss_and_writes_back(tiers):
    cpu, lower = tiers
    put_direct(cpu, 0)
    put_direct(lower, 1)
    put_direct(lower, 0)  # both tiers have 0: the first tier serves it
    put_direct(cpu, 3)
    sm = StorageManager([cpu, lower], allocator_backend=cpu)
    out = sm.batched_get([key(0), key(1), key(2), key(3)])
    assert out[0] is cpu.hot_cache[key(0)] and out[2] is None and out[3] is None
    assert torch.equal(out[1].tensor, torch.full(SHAPE, 1.0, dtype=torch.float16))
    assert cpu.hot_cache[key(1)] is out[1]  # written back into the CPU tier
    assert out[1].get_ref_count() == 3  # lower tier + cpu tier + caller
    assert lower.num_hits == 1 and cpu.num_hits == 1
    for o in out[:2]:
        o.ref_count_down()


def test_no_write_back_when_allocator_backend_is_not_a_tier(tiers):
    cpu, lower = tiers
    put_direct(lower, 0)
    sm = StorageManager([lower], allocator_backend=cpu)
    [obj] = sm.batched_get([key(0)])
    assert obj is not None and len(cpu) == 0
    obj.ref_count_down()
    sm.close()  # closes lower and the allocator_backend
    assert len(lower) == 0


def test_failing_tier_costs_hits_only(tiers):
    cpu, _ = tiers
    sm = StorageManager([BrokenTier(), cpu], allocator_backend=cpu)
    obj = sm.allocate(SHAPE, torch.float16)
    obj.tensor.fill_(7.0)
    sm.batched_put([key(0)], [obj])
    assert sm.contains_prefix([key(0), key(1)], pin=True) == 1
    assert sm.get_block_mapping([key(0)]) == {"LocalCPUBackend": [0]}
    [got, miss] = sm.batched_get([key(0), key(1)])
    assert miss is None and torch.all(got.tensor == 7.0)
    got.ref_count_down()
    sm.unpin([key(0)])
    assert not cpu.hot_cache[key(0)].is_pinned
    sm.clear()
    sm.close()
    assert sm.num_tier_errors >= 7 and len(cpu) == 0


def test_allocate_without_allocator_backend():
    sm = StorageManager([BrokenTier()])
    with pytest.raises(RuntimeError, match="allocator_backend"):
        sm.allocate(SHAPE, torch.float16)


def test_store_prefix_that_fits_with_eviction(tiers):
    cpu, _ = tiers
    sm = StorageManager([cpu], allocator_backend=cpu)
    for i in range(8):
        put_direct(cpu, i)
    sm.contains_prefix([key(i) for i in range(6)], pin=True)  # pins 0..5
    objs = []
    while (obj := sm.allocate(SHAPE, torch.float16)) is not None:
        objs.append(obj)
    assert len(objs) == 2 and cpu.num_evictions == 2  # only 6, 7 were evictable
    sm.batched_put([key(100 + i) for i in range(2)], objs)
    assert sm.contains_prefix([key(i) for i in range(6)]) == 6
    sm.unpin([key(i) for i in range(6)])
