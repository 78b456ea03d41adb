import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory import CPUMemoryAllocator, MemoryFormat
from lmcache.storage.backends import LocalCPUBackend, StorageBackendInterface
from lmcache.storage.policy import (
    FIFOCachePolicy, LFUCachePolicy, LRUCachePolicy, MRUCachePolicy,
)

SHAPE = (2, 1, 4, 8)  # KV_2LTD [2, L, T, D] float32: 256 bytes
KB = 1 / 1024**2  # GB per KiB


def key(i, model="m"):
    return CacheEngineKey(model, 1, 0, i, torch.float32)


@pytest.fixture
def backend():
    alloc = CPUMemoryAllocator(4 * 256, alignment=256)
    be = LocalCPUBackend(alloc, LRUCachePolicy(), max_local_cpu_size=1.0)
    yield be
    be.close()
    alloc.close()


def store(be, i, value=None):
    obj = be.allocate(SHAPE, torch.float32, MemoryFormat.KV_2LTD)
    assert obj is not None
    obj.tensor.fill_(float(i if value is None else value))
    be.put(key(i), obj)
    obj.ref_count_down()  # producer's ref
    return obj


def test_put_get_refcounts(backend):
    obj = store(backend, 1)
    assert isinstance(backend, StorageBackendInterface) and backend.name == "LocalCPUBackend"
    assert obj.get_ref_count() == 1 and backend.contains(key(1)) and len(backend) == 1
    got = backend.get_blocking(key(1))
    assert got is obj and got.get_ref_count() == 2
    assert torch.all(got.tensor == 1.0) and got.tensor.shape == SHAPE
    got.ref_count_down()
    assert backend.get_blocking(key(2)) is None
    assert (backend.num_hits, backend.num_misses) == (1, 1)
    assert backend.held_bytes == 256 and backend.keys() == [key(1)]
    assert backend.remove(key(1)) and not backend.remove(key(1))
    assert not obj.is_valid and backend.allocator.used_bytes == 0


def test_put_replaces_existing_entry(backend):
    old = store(backend, 1)
    backend.contains(key(1), pin=True)
    new = backend.allocate(SHAPE, torch.float32)
    new.tensor.fill_(9.0)
    backend.put(key(1), new)
    new.ref_count_down()
    assert not old.is_valid  # old ref dropped, memory freed
    assert backend.hot_cache[key(1)] is new and new.get_ref_count() == 1
    assert new.get_pin_count() == 1  # the lookup's pin carries over
    assert backend.held_bytes == 256 and backend.allocator.num_active_allocations == 1
    backend.put(key(1), new)  # same object again: no extra ref
    assert new.get_ref_count() == 1
    assert backend.unpin(key(1)) and not backend.unpin(key(1)) and not backend.unpin(key(7))


def test_batched_contains_and_pin(backend):
    for i in range(3):
        store(backend, i)
    assert backend.batched_contains([key(0), key(1), key(5), key(2)], pin=True) == 2
    assert [backend.hot_cache[key(i)].is_pinned for i in range(3)] == [True, True, False]
    objs = backend.batched_get_blocking([key(0), key(5), key(2)])
    assert objs[1] is None and [float(o.tensor[0, 0, 0, 0]) for o in (objs[0], objs[2])] == [0, 2]
    for o in (objs[0], objs[2]):
        o.ref_count_down()


@pytest.mark.parametrize("policy,touch,expected_survivors", [
    (LRUCachePolicy, [0, 1], {0, 1, 4}),     # evicts 2, then 3 (least recent)
    (FIFOCachePolicy, [0, 1], {2, 3, 4}),    # evicts 0, 1 (oldest) regardless of hits
    (MRUCachePolicy, [0, 1], {2, 3, 4}),     # evicts 1, then 0 (most recent)
    (LFUCachePolicy, [3, 3, 2], {2, 3, 4}),  # evicts 0, 1 (fewest uses)
])
def test_eviction_order_by_policy(policy, touch, expected_survivors):
    alloc = CPUMemoryAllocator(4 * 256, alignment=256)
    be = LocalCPUBackend(alloc, policy(), max_local_cpu_size=1.0)
    for i in range(4):
        store(be, i)
    for i in touch:
        be.get_blocking(key(i)).ref_count_down()
    big = be.allocate((2, 1, 8, 8), torch.float32)  # 512 bytes: needs two evictions
    assert big is not None and be.num_evictions == 2
    be.put(key(4), big)
    big.ref_count_down()
    assert {k.chunk_hash for k in be.keys()} == expected_survivors
    for i in expected_survivors - {4}:
        got = be.get_blocking(key(i))
        assert torch.all(got.tensor == float(i))  # survivors' data untouched
        got.ref_count_down()
    be.close()
    assert alloc.used_bytes == 0


def test_pinned_and_referenced_objects_never_evicted(backend):
    for i in range(4):
        store(backend, i)
    backend.contains(key(0), pin=True)
    reader = backend.get_blocking(key(1))  # a reader holds a ref
    a = backend.allocate(SHAPE, torch.float32)
    b = backend.allocate(SHAPE, torch.float32)
    assert a is not None and b is not None
    assert backend.allocate(SHAPE, torch.float32) is None  # only 0 (pinned), 1 (read) left
    assert {k.chunk_hash for k in backend.keys()} == {0, 1}
    assert torch.all(reader.tensor == 1.0)
    assert backend.allocate(SHAPE, torch.float32, evict=False) is None
    backend.unpin(key(0))
    c = backend.allocate(SHAPE, torch.float32)
    assert c is not None and backend.keys() == [key(1)]
    for o in (a, b, c, reader):
        o.ref_count_down()


def test_store_prefix_that_fits(backend):
    stored = 0
    held = []
    for i in range(6):  # the producer holds every object: nothing is evictable
        obj = backend.allocate(SHAPE, torch.float32)
        if obj is None:
            break
        obj.tensor.fill_(float(i))
        backend.put(key(i), obj)
        held.append(obj)
        stored += 1
    assert stored == 4 and backend.keys() == [key(i) for i in range(4)]
    for obj in held:
        obj.ref_count_down()


def test_max_local_cpu_size_caps_bytes():
    alloc = CPUMemoryAllocator(8 * 1024, alignment=256)
    be = LocalCPUBackend(alloc, FIFOCachePolicy(), max_local_cpu_size=1 * KB)  # 1 KiB cap
    assert be.max_bytes == 1024
    for i in range(6):
        store(be, i)
    assert len(be) == 4 and be.held_bytes == 1024 and alloc.used_bytes == 1024
    assert {k.chunk_hash for k in be.keys()} == {2, 3, 4, 5} and be.num_evictions == 2
    assert be.allocate((2, 1, 32, 8), torch.float32) is None  # 2 KiB can never fit
    assert len(be) == 4  # and evicted nothing for it
    # an object from elsewhere that would exceed the cap with nothing evictable is skipped
    readers = [be.get_blocking(k) for k in be.keys()]
    other = alloc.allocate(SHAPE, torch.float32)
    be.put(key(99), other)
    assert not be.contains(key(99)) and be.num_rejected_puts == 1
    for o in readers + [other]:
        o.ref_count_down()
    be.close()


def test_clear_and_bad_size(backend):
    for i in range(3):
        store(backend, i)
    assert backend.clear() == 3 and len(backend) == 0 and backend.allocator.used_bytes == 0
    with pytest.raises(ValueError, match="max_local_cpu_size"):
        LocalCPUBackend(backend.allocator, LRUCachePolicy(), max_local_cpu_size=0)


def test_batched_put_length_mismatch(backend):
    with pytest.raises(ValueError, match="2 keys but 1"):
        backend.batched_put([key(0), key(1)], [object()])
