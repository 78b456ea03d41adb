"""StorageManager over real tiers (LocalCPUBackend + LocalDiskBackend on tmp_path): lookup
prefetch through the EventManager, per-tier batched gets, retrieve_locations / store_location."""

from __future__ import annotations

import threading

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.event_manager import EventStatus, EventType
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy

from storage_chunks import SHAPE, eventually, value


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("meta-llama/Llama-3.1-8B", 1, 0, 0xFE7C000 + i, torch.bfloat16)


class CountingDisk(LocalDiskBackend):
    """A real disk tier that records the keys of each batched_get_blocking call."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.batched_calls: list[list[CacheEngineKey]] = []

    def batched_get_blocking(self, keys):
        self.batched_calls.append(list(keys))
        return super().batched_get_blocking(keys)


class GatedDisk(LocalDiskBackend):
    """A real disk tier whose background reads wait for ``gate`` (a slow device)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gate = threading.Event()

    def batched_get_non_blocking(self, keys):
        return [self._readers.submit(self._gated_get, k) for k in keys]

    def _gated_get(self, k):
        self.gate.wait(60)
        return self.get_blocking(k)


class NoPrefetchDisk(LocalDiskBackend):
    """A real disk tier that cannot start background reads (its reader pool is gone)."""

    def batched_get_non_blocking(self, keys):
        raise OSError("reader pool unavailable")


class RacingCPU(LocalCPUBackend):
    """A real CPU tier that loses its chunks between a contains and the get (eviction race)."""

    def batched_get_blocking(self, keys):
        for k in keys:
            self.remove(k)
        return super().batched_get_blocking(keys)


@pytest.fixture
def rig(tmp_path):
    """make(disk_cls=LocalDiskBackend, cpu_cls=LocalCPUBackend, **manager_kw) -> (sm, cpu,
    disk); everything is closed (and the allocator checked empty by conftest) afterwards."""
    made = []

    def make(disk_cls=LocalDiskBackend, cpu_cls=LocalCPUBackend, **kw):
        allocator = CPUMemoryAllocator(2 << 20, pin_memory=False)
        cpu = cpu_cls(allocator, LRUCachePolicy(), max_local_cpu_size=2 / 1024)
        disk = disk_cls(cpu, LRUCachePolicy(), local_disk=str(tmp_path / f"disk{len(made)}"),
                        max_local_disk_size=1 / 1024)
        sm = StorageManager([cpu, disk], **kw)
        made.append((sm, allocator))
        return sm, cpu, disk

    yield make
    for sm, allocator in made:
        sm.close()
        allocator.close()


def put(sm: StorageManager, ids, store_location=None) -> None:
    objs = []
    for i in ids:
        obj = sm.allocate(SHAPE, torch.bfloat16, MemoryFormat.KV_2LTD)
        obj.tensor.copy_(value(i))
        objs.append(obj)
    sm.batched_put([key(i) for i in ids], objs, store_location=store_location)
    for backend in sm.backends:
        if hasattr(backend, "flush"):
            assert backend.flush(timeout=60)


def check_and_release(objs, ids) -> None:
    assert len(objs) == len(ids)
    for obj, i in zip(objs, ids):
        assert obj is not None and torch.equal(obj.tensor, value(i)), i
        obj.ref_count_down()


def prefetch_done(sm: StorageManager, lookup_id, ids) -> bool:
    return all(sm.event_manager.get_event_status(EventType.LOADING, (lookup_id, key(i)))
               == EventStatus.DONE for i in ids)


def test_prefetched_disk_chunks_are_the_pin_and_are_written_back(rig):
    sm, cpu, disk = rig()
    put(sm, range(4), store_location="LocalDiskBackend")
    assert len(cpu) == 0 and len(disk) == 4
    keys = [key(i) for i in range(4)]
    assert sm.contains_prefix(keys, pin=True, lookup_id="req-1") == 4
    assert sm.num_prefetches == 1 and sm.stats["prefetch_chunks"] == 4
    assert eventually(lambda: prefetch_done(sm, "req-1", range(4)))
    # written back into the CPU tier on arrival, where the event's reference pins them
    assert set(cpu.keys()) == set(keys)
    assert not any(o.can_evict for o in cpu.hot_cache.values())
    cpu.clear()
    disk.clear()  # the chunks leave every tier: the prefetched memory still holds them
    assert sm.contains_prefix(keys) == 0
    out = sm.batched_get(keys, lookup_id="req-1")
    assert cpu.keys() == keys  # written back again by the retrieve
    assert [o.get_ref_count() for o in out] == [2] * 4  # CPU tier + caller
    check_and_release(out, range(4))
    assert sm.num_prefetches == 0 and sm.stats["prefetch_hits"] == 4
    sm.unpin(keys)  # the engine releases the disk pins it took (files gone: no-ops)


def test_retrieve_takes_only_what_it_needs_and_releases_the_rest(rig):
    sm, cpu, disk = rig()
    put(sm, range(5), store_location="LocalDiskBackend")
    keys = [key(i) for i in range(5)]
    assert sm.contains_prefix(keys, lookup_id="r") == 5
    assert eventually(lambda: prefetch_done(sm, "r", range(5)))
    assert cpu.allocator.num_active_allocations == 5  # five prefetched chunks
    assert [o.get_ref_count() for o in cpu.hot_cache.values()] == [2] * 5  # tier + event
    out = sm.batched_get(keys[2:4], lookup_id="r")  # the engine already has chunks 0-1
    assert [o.get_ref_count() for o in out] == [2, 2]  # tier + caller
    check_and_release(out, [2, 3])
    # the events' references of 0, 1 and 4 are released: plain, evictable CPU-tier chunks
    assert set(cpu.keys()) == set(keys) and all(o.can_evict for o in cpu.hot_cache.values())
    assert cpu.allocator.num_active_allocations == 5
    assert sm.num_prefetches == 0 and not sm.discard_prefetch("r")


def test_relookup_finds_the_cpu_copy_and_discard_releases(rig):
    sm, cpu, disk = rig()
    put(sm, range(3), store_location="LocalDiskBackend")
    keys = [key(i) for i in range(3)]
    assert sm.contains_prefix(keys, pin=True, lookup_id="a") == 3
    assert eventually(lambda: prefetch_done(sm, "a", range(3)))
    # vLLM asks again while the request waits: the engine releases "a", then looks up again
    sm.unpin(keys)
    assert sm.discard_prefetch("a") and not sm.discard_prefetch("a")
    assert sm.contains_prefix(keys, pin=True, lookup_id="a") == 3
    assert sm.num_prefetches == 0 and sm.stats["prefetch_chunks"] == 3  # CPU copies: no re-read
    assert [cpu.hot_cache[k].get_pin_count() for k in keys] == [1, 1, 1]
    sm.unpin(keys)
    # a prefetch discarded before (or after) its reads arrive: the events' references are
    # released on arrival and the CPU tier alone keeps the chunks
    cpu.clear()
    assert sm.contains_prefix(keys, lookup_id="b") == 3
    assert sm.discard_prefetch("b") and sm.num_prefetches == 0
    assert eventually(lambda: len(cpu) == 3 and all(o.can_evict for o in cpu.hot_cache.values()))
    assert cpu.allocator.num_active_allocations == 3
    out = sm.batched_get(keys, lookup_id="b")  # nothing prefetched any more: read the tiers
    check_and_release(out, range(3))


def test_mixed_tiers_pins_prefetch_and_parallel_runs(rig):
    sm, cpu, disk = rig(disk_cls=CountingDisk)
    put(sm, [1, 2, 3, 5], store_location="LocalDiskBackend")
    put(sm, [0, 4], store_location="LocalCPUBackend")
    keys = [key(i) for i in range(7)]
    assert sm.get_block_mapping(keys) == {"LocalCPUBackend": [0, 4],
                                          "LocalDiskBackend": [1, 2, 3, 5]}
    # plain retrieve: one batched_get_blocking per contiguous run of disk chunks
    out = sm.batched_get(keys)
    assert out[6] is None
    check_and_release(out[:6], range(6))
    assert disk.batched_calls == [keys[1:4], keys[5:6]]
    for i in (1, 2, 3, 5):  # written back
        cpu.remove(key(i))
    # lookup with an id: CPU chunks pinned, disk chunks prefetched (and pinned on disk)
    assert sm.contains_prefix(keys, pin=True, lookup_id=7) == 6
    assert [cpu.hot_cache[key(i)].get_pin_count() for i in (0, 4)] == [1, 1]
    assert sm.stats["prefetch_chunks"] == 4
    out = sm.batched_get(keys, lookup_id=7)
    check_and_release(out[:6], range(6))
    assert disk.batched_calls == [keys[1:4], keys[5:6]]  # prefetched: not read again
    assert sm.stats["prefetch_hits"] == 4
    sm.unpin(keys[:6])
    assert not any(o.is_pinned for o in cpu.hot_cache.values()) and not disk._pins


def test_prefetch_late_past_the_deadline_is_a_miss_without_a_second_wait(rig):
    sm, cpu, disk = rig(disk_cls=GatedDisk, blocking_timeout_secs=0.2)
    put(sm, range(2), store_location="LocalDiskBackend")
    keys = [key(i) for i in range(2)]
    assert sm.contains_prefix(keys, lookup_id="slow") == 2
    assert sm.batched_get(keys, lookup_id="slow") == [None, None]
    assert sm.stats["prefetch_misses"] == 1 and sm.num_prefetches == 0
    assert len(cpu) == 0
    disk.gate.set()  # the late reads complete now: written back, the events' refs released
    assert eventually(lambda: len(cpu) == 2 and all(o.can_evict for o in cpu.hot_cache.values()))
    assert cpu.allocator.num_active_allocations == 2
    out = sm.batched_get(keys)
    check_and_release(out, range(2))


def test_prefetch_that_cannot_start_shortens_the_lookup_and_releases_pins(rig):
    sm, cpu, disk = rig(disk_cls=NoPrefetchDisk)
    put(sm, [0], store_location="LocalCPUBackend")
    put(sm, [1, 2], store_location="LocalDiskBackend")
    keys = [key(i) for i in range(3)]
    assert sm.contains_prefix(keys, pin=True) == 3  # no lookup_id: no prefetch, all pinned
    sm.unpin(keys)
    assert sm.contains_prefix(keys, pin=True, lookup_id="x") == 1  # disk chunks not promised
    assert cpu.hot_cache[key(0)].get_pin_count() == 1 and not disk._pins
    assert sm.num_tier_errors == 1 and sm.num_prefetches == 0
    sm.unpin(keys[:1])


def test_chunk_lost_between_contains_and_get_is_read_from_another_tier(rig):
    sm, cpu, disk = rig(cpu_cls=RacingCPU)
    put(sm, range(3))  # in both tiers
    out = sm.batched_get([key(i) for i in range(3)])
    check_and_release(out, range(3))
    assert disk.stats["hits"] == 3


def test_store_location_and_retrieve_locations(rig):
    sm, cpu, disk = rig()
    assert sm.tier_names == ["LocalCPUBackend", "LocalDiskBackend"]
    put(sm, range(2), store_location="LocalDiskBackend")
    keys = [key(i) for i in range(2)]
    assert len(cpu) == 0 and len(disk) == 2
    assert sm.contains_prefix(keys, retrieve_locations=["LocalCPUBackend"]) == 0
    assert sm.contains_prefix(keys, retrieve_locations="LocalDiskBackend") == 2
    assert sm.get_block_mapping(keys, retrieve_locations=["LocalCPUBackend"]) == {}
    assert sm.get_block_mapping(keys, ["LocalDiskBackend", "LocalCPUBackend"]) == {
        "LocalDiskBackend": [0, 1]}
    assert sm.batched_get(keys, retrieve_locations=["LocalCPUBackend"]) == [None, None]
    check_and_release(sm.batched_get(keys, retrieve_locations=["LocalDiskBackend"]), range(2))
    assert sm.contains_prefix(keys, retrieve_locations=["LocalCPUBackend"]) == 2  # write-back
    put(sm, [5], store_location="LocalCPUBackend")
    assert key(5) in cpu.hot_cache and not disk.contains(key(5))
    # a lookup restricted to the disk prefetches from it only
    assert sm.contains_prefix(keys, lookup_id="d", retrieve_locations=["LocalDiskBackend"]) == 2
    check_and_release(sm.batched_get(keys, lookup_id="d"), range(2))
    assert sm.stats["prefetch_hits"] == 2


def test_bad_locations_are_clear_errors_and_keep_references(rig):
    sm, cpu, disk = rig()
    obj = sm.allocate(SHAPE, torch.bfloat16)
    with pytest.raises(ValueError, match=r"store_location names unknown tier\(s\) \['S3'\]; "
                       r"the tiers are \['LocalCPUBackend', 'LocalDiskBackend'\]"):
        sm.batched_put([key(0)], [obj], store_location="S3")
    with pytest.raises(TypeError, match="store_location must be one backend name"):
        sm.batched_put([key(0)], [obj], store_location=["LocalDiskBackend"])
    assert obj.get_ref_count() == 1 and len(cpu) == 0 and len(disk) == 0
    obj.ref_count_down()
    with pytest.raises(ValueError, match="must name at least one tier"):
        sm.contains_prefix([key(0)], retrieve_locations=[])
    with pytest.raises(TypeError, match=r"backend names \(str\), got \[3\]"):
        sm.batched_get([key(0)], retrieve_locations=["LocalCPUBackend", 3])
    with pytest.raises(TypeError, match="unhashable"):
        sm.contains_prefix([key(0)], lookup_id=["not", "hashable"])
    with pytest.raises(ValueError, match="blocking_timeout_secs must be > 0"):
        StorageManager([cpu], blocking_timeout_secs=0)


def test_blocking_timeout_defaults_from_the_tiers(rig):
    sm, cpu, disk = rig()
    assert sm.blocking_timeout_secs == 10.0  # no tier has one: LMCache's default
    disk.blocking_timeout_secs = 2.5
    assert StorageManager([cpu, disk]).blocking_timeout_secs == 2.5
