"""EventManager: a retrieve waits only for the prefetched chunks it needs; the rest are
released when they arrive."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
import torch

from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.storage.event_manager import EventManager, EventStatus, EventType


@pytest.fixture
def allocator():
    a = CPUMemoryAllocator(1 << 20, pin_memory=False)
    yield a
    a.close()


def objs(allocator, n):
    return [allocator.allocate((4, 4), torch.float32, MemoryFormat.KV_2LTD) for _ in range(n)]


def test_take_waits_only_for_needed_items_and_releases_the_rest(allocator):
    em = EventManager()
    futures = [Future() for _ in range(4)]
    em.add_event(EventType.LOADING, "req-1", futures)
    assert em.get_event_status(EventType.LOADING, "req-1") == EventStatus.ONGOING
    a, b, c, d = objs(allocator, 4)
    futures[0].set_result(a)
    futures[1].set_result(b)
    # items 2 and 3 are still loading: taking 2 items must not wait for them
    got = em.take(EventType.LOADING, "req-1", 2)
    assert got == [a, b]
    assert em.get_event_status(EventType.LOADING, "req-1") == EventStatus.NOT_FOUND
    futures[2].set_result(c)
    futures[3].set_result(d)
    assert not c.is_valid and not d.is_valid   # released on arrival
    assert a.get_ref_count() == 1 and b.get_ref_count() == 1
    a.ref_count_down()
    b.ref_count_down()
    assert allocator.num_active_allocations == 0


def test_take_stops_at_first_gap_and_at_the_deadline(allocator):
    em = EventManager()
    futures = [Future() for _ in range(4)]
    a, c = objs(allocator, 2)
    futures[0].set_result(a)
    futures[1].set_result(None)          # a miss ends the usable prefix
    futures[2].set_result(c)
    em.add_event(EventType.LOADING, 7, futures)
    assert em.take(EventType.LOADING, 7, 4, timeout=0.01) == [a, None, None, None]
    assert not c.is_valid                 # after the gap: released
    a.ref_count_down()

    slow = [Future(), Future()]
    em.add_event(EventType.LOADING, 8, slow)
    assert em.take(EventType.LOADING, 8, 2, timeout=0.05) == [None, None]
    late = objs(allocator, 1)[0]
    slow[0].set_result(late)              # arrives after the deadline: released
    slow[1].set_exception(RuntimeError("remote down"))
    assert not late.is_valid


def test_results_from_other_threads_and_discard(allocator):
    em = EventManager()
    futures = [Future() for _ in range(3)]
    em.add_event(EventType.LOADING, "r", futures)
    produced = objs(allocator, 3)
    threading.Thread(target=lambda: [f.set_result(o) for f, o in zip(futures, produced)]).start()
    got = em.take(EventType.LOADING, "r", 3, timeout=60)
    assert got == produced
    for o in got:
        o.ref_count_down()

    more = [Future(), Future()]
    em.add_event(EventType.LOADING, "gone", more)
    assert em.discard(EventType.LOADING, "gone") and not em.discard(EventType.LOADING, "gone")
    x, y = objs(allocator, 2)
    more[0].set_result(x)
    more[1].set_result(y)
    assert not x.is_valid and not y.is_valid
    em.add_event(EventType.LOADING, "closing", [Future()])
    em.close()
    assert len(em) == 0


def test_errors():
    em = EventManager()
    em.add_event(EventType.LOADING, "a", [])
    with pytest.raises(ValueError, match="LOADING event 'a' already registered"):
        em.add_event(EventType.LOADING, "a", [])
    with pytest.raises(TypeError, match="EventType"):
        em.add_event("loading", "b", [])
    with pytest.raises(ValueError, match="num_items must be >= 0"):
        em.take(EventType.LOADING, "a", -1)
    assert em.take(EventType.LOADING, "nope", 1) is None
    assert em.get_event_status(EventType.LOADING, "a") == EventStatus.DONE


def test_prefetch_from_a_slower_tier_then_take(tmp_path):
    """The intended use: lookup starts per-chunk fetches, retrieve takes what it needs."""
    from lmcache.keys import CacheEngineKey
    from lmcache.serde.naive import NaiveSerde
    from lmcache.storage.backends.local_cpu import LocalCPUBackend
    from lmcache.storage.backends.remote import RemoteBackend
    from lmcache.storage.connectors.fs import FSConnector
    from lmcache.storage.policy.lru import LRUCachePolicy

    allocator = CPUMemoryAllocator(1 << 20, pin_memory=False)
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
    remote = RemoteBackend(cpu, NaiveSerde(), FSConnector(f"fs://{tmp_path}"))
    keys = [CacheEngineKey("m", 1, 0, i, torch.float32) for i in range(4)]
    for i, k in enumerate(keys):
        obj = cpu.allocate((4, 4), torch.float32, MemoryFormat.KV_2LTD)
        obj.tensor.fill_(i)
        remote.put(k, obj)
        obj.ref_count_down()
    assert remote.flush(timeout=60)
    em = EventManager()
    n = remote.batched_contains(keys)
    em.add_event(EventType.LOADING, "lookup-1", remote.batched_get_non_blocking(keys[:n]))
    got = em.take(EventType.LOADING, "lookup-1", 2, timeout=60)  # the retrieve needs 2 chunks
    assert [float(o.tensor[0, 0]) for o in got] == [0.0, 1.0]
    for o in got:
        o.ref_count_down()
    remote.close()  # waits for the two fetches nobody took; they are released on arrival
    assert allocator.num_active_allocations == 0
    cpu.close()
    allocator.close()
