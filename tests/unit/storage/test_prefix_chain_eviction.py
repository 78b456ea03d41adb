"""Issue 7.14: eviction respects the prefix chain, in the CPU and the disk tier, every policy.

A chunk is never evicted while later chunks of its prefix stay (evict from the tail); a hit on
a prefix keeps it (its chunks cannot go before the tail). Real tiers, real files, real memory.
"""

from __future__ import annotations

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.serde.wire.chunk_file import FILE_HEADER_SIZE
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy import LRUCachePolicy
from lmcache.storage.policy.prefix_chain import PrefixChain

from storage_chunks import CHUNK, POLICIES, SHAPE, prompt


def store(sm: StorageManager, keys: list[CacheEngineKey]) -> None:
    """As the engine stores: skip the cached prefix, allocate every new chunk, then put."""
    present = sm.contains_prefix(keys)
    objs = []
    for i, _ in enumerate(keys[present:], start=present):
        obj = sm.allocate(SHAPE, torch.bfloat16)
        assert obj is not None
        obj.tensor.fill_(i)
        objs.append(obj)
    sm.batched_put(keys[present:], objs,
                   prefix_parent=keys[present - 1] if present else None)


def hit(sm: StorageManager, keys: list[CacheEngineKey]) -> None:
    for obj in sm.batched_get(keys):
        assert obj is not None
        obj.ref_count_down()


def unreachable(held: set, prompts: list[list[CacheEngineKey]], sm: StorageManager) -> int:
    reachable = set()
    for keys in prompts:
        reachable.update(keys[:sm.contains_prefix(keys)])
    return len(held - reachable)


@pytest.fixture
def cpu_tier():
    made = []

    def make(policy: str, chunks: int = 10):
        allocator = CPUMemoryAllocator(64 * CHUNK, pin_memory=False)
        cpu = LocalCPUBackend(allocator, POLICIES[policy](),
                              max_local_cpu_size=chunks * CHUNK / 2**30)
        made.append((cpu, allocator))
        return cpu
    yield make
    for cpu, allocator in made:
        cpu.close()
        allocator.close()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_cpu_tier_evicts_the_first_prompt_from_its_tail(cpu_tier, policy):
    cpu = cpu_tier(policy)
    sm = StorageManager([cpu])
    a, b = prompt(0xA, 8), prompt(0xB, 4)
    store(sm, a)
    store(sm, b)
    # Today's order (head first) left 0 hits for A and 6 unreachable chunks.
    assert (sm.contains_prefix(a), sm.contains_prefix(b)) == (6, 4)
    assert set(cpu.keys()) == set(a[:6] + b)
    assert unreachable(set(cpu.keys()), [a, b], sm) == 0
    assert cpu.num_evictions == 2


@pytest.mark.parametrize("policy,expected", [
    ("lru", (5, 2, 3)), ("fifo", (5, 2, 3)), ("lfu", (5, 2, 3)), ("mru", (7, 0, 3))])
def test_cpu_tier_a_hit_keeps_the_prefix_and_nothing_is_unreachable(cpu_tier, policy, expected):
    cpu = cpu_tier(policy)
    sm = StorageManager([cpu])
    a, b, c = prompt(0xA, 8), prompt(0xB, 2), prompt(0xC, 3)
    store(sm, a)
    store(sm, b)
    hit(sm, a[:3])  # a shorter prompt sharing A's first 3 chunks
    store(sm, c)
    # Plain LRU would evict A3..A5 (0 reach past A2, A6/A7 unreachable); the tail goes first.
    assert (sm.contains_prefix(a), sm.contains_prefix(b), sm.contains_prefix(c)) == expected
    assert unreachable(set(cpu.keys()), [a, b, c], sm) == 0


def test_pinned_tail_keeps_its_prefix_and_store_gets_what_fits(cpu_tier):
    cpu = cpu_tier("lru")
    sm = StorageManager([cpu])
    a, b = prompt(0xA, 10), prompt(0xB, 4)
    store(sm, a)
    assert sm.contains_prefix(a, pin=True) == 10      # a lookup promised all of A
    assert sm.allocate(SHAPE, torch.bfloat16) is None  # nothing evictable: A stays whole
    sm.unpin(a)
    store(sm, b)
    assert (sm.contains_prefix(a), sm.contains_prefix(b)) == (6, 4)


def test_a_stored_continuation_links_to_the_cached_prefix(cpu_tier):
    cpu = cpu_tier("lru")
    sm = StorageManager([cpu])
    a = prompt(0xA, 8)
    store(sm, a[:5])        # first step of a chunked prefill
    store(sm, a)            # next step: chunks 5..7 follow chunk 4
    assert cpu.chain.parent(a[5]) == a[4] and cpu.chain.parent(a[1]) == a[0]
    store(sm, prompt(0xB, 4))
    assert sm.contains_prefix(a) == 6


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_disk_tier_evicts_from_the_tail(tmp_path, policy):
    allocator = CPUMemoryAllocator(64 * CHUNK, pin_memory=False)
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=64 * CHUNK / 2**30)
    file_size = FILE_HEADER_SIZE + CHUNK
    disk = LocalDiskBackend(cpu, POLICIES[policy](), local_disk=str(tmp_path),
                            max_local_disk_size=10 * file_size / 2**30)
    sm = StorageManager([disk], allocator_backend=cpu)  # the disk tier alone
    try:
        a, b = prompt(0xA, 8), prompt(0xB, 4)
        store(sm, a)
        assert disk.flush(timeout=60)
        store(sm, b)
        assert disk.flush(timeout=60)
        assert (sm.contains_prefix(a), sm.contains_prefix(b)) == (6, 4)
        assert disk.stats["evictions"] == 2
        for i, obj in enumerate(sm.batched_get(a)[:6]):
            assert bool((obj.tensor == i).all())
            obj.ref_count_down()
    finally:
        sm.close()
        cpu.close()
        allocator.close()


def test_prefix_chain_yields_parents_as_they_become_leaves():
    chain = PrefixChain()
    present = {"a0", "a1", "a2", "b0"}
    chain.link(["a0", "a1", "a2"], None, present.__contains__)
    chain.link(["b0"], "a0", present.__contains__)  # a branch off a0
    order = ["a0", "a1", "b0", "a2"]  # the policy's order, first victim first
    got = []
    for key in chain.victims(order):
        got.append(key)
        chain.remove(key)  # evicted
    assert got == ["b0", "a2", "a1", "a0"]
    assert len(chain) == 0
