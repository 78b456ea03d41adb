"""Issue 7.14 across a restart: the disk tier keeps its prefix links in
``<local_disk>/.lmcache-prefix-links``, so a restarted tier still evicts from the tail of a
prefix (real files, real memory, a fresh LocalDiskBackend on the same directory)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.serde.wire.chunk_file import FILE_HEADER_SIZE
from lmcache.storage.backends import disk_links
from lmcache.storage.backends.disk_names import key_to_filename
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy import LRUCachePolicy

from storage_chunks import CHUNK, POLICIES, SHAPE, prompt


@pytest.fixture
def tiers(tmp_path):
    allocator = CPUMemoryAllocator(64 * CHUNK, pin_memory=False)
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=64 * CHUNK / 2**30)
    made = []

    def open_disk(policy: str = "lru") -> tuple[LocalDiskBackend, StorageManager]:
        disk = LocalDiskBackend(cpu, POLICIES[policy](), local_disk=str(tmp_path),
                                max_local_disk_size=10 * (FILE_HEADER_SIZE + CHUNK) / 2**30)
        sm = StorageManager([disk], allocator_backend=cpu)  # the disk tier alone
        made.append(sm)
        return disk, sm

    yield open_disk
    for sm in made:
        sm.close()
    assert allocator.num_active_allocations == 0
    allocator.close()


def store(sm: StorageManager, keys: list[CacheEngineKey]) -> None:
    present = sm.contains_prefix(keys)
    objs = []
    for i in range(present, len(keys)):
        obj = sm.allocate(SHAPE, torch.bfloat16)
        obj.tensor.fill_(i)
        objs.append(obj)
    sm.batched_put(keys[present:], objs, prefix_parent=keys[present - 1] if present else None)
    for tier in sm.backends:
        assert tier.flush(timeout=60)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_restarted_disk_tier_still_evicts_from_the_tail(tiers, policy):
    a, b = prompt(0xA, 8), prompt(0xB, 4)
    disk, sm = tiers(policy)
    store(sm, a)
    sm.close()
    disk, sm = tiers(policy)  # restarted: index and links rebuilt from the directory
    assert len(disk) == 8 and len(disk.chain) == 7
    assert [disk.chain.parent(k) for k in a[1:]] == a[:-1]
    store(sm, b)
    # Before: after a restart the disk tier evicted by policy alone (lru, fifo, lfu: A0 and A1
    # went, leaving 0 hits for A and 6 unreachable chunks).
    assert (sm.contains_prefix(a), sm.contains_prefix(b)) == (6, 4)
    assert disk.stats["evictions"] == 2 and not disk.contains(a[6]) and not disk.contains(a[7])
    for i, obj in enumerate(sm.batched_get(a)[:6]):
        assert bool((obj.tensor == i).all())
        obj.ref_count_down()


def test_the_link_log_keeps_only_live_links_and_skips_torn_lines(tiers, tmp_path):
    a = prompt(0xA, 4)
    disk, sm = tiers()
    store(sm, a)
    log = tmp_path / disk_links.NAME
    assert sorted(json.loads(x) for x in log.read_text().splitlines()) == [
        [a[i].to_string(), a[i - 1].to_string()] for i in range(1, 4)]  # in write order
    for obj in sm.batched_get(a):  # (a read logs nothing)
        obj.ref_count_down()
    assert disk.remove(a[2])
    sm.close()
    with open(log, "a") as f:
        f.write('["m@1@0@a01@bfloat16", "no key"]\n["m@1@0@a0')  # foreign line, torn line
    disk, sm = tiers()
    assert len(disk) == 3 and disk.chain.links() == [(a[1], a[0])]  # a[3]'s parent is gone
    assert log.read_text() == json.dumps([a[1].to_string(), a[0].to_string()]) + "\n"
    assert disk.links.errors == 0
    assert sorted(os.listdir(tmp_path)) == sorted(
        [disk_links.NAME] + [key_to_filename(k.to_string(), ".kvc") for k in (a[0], a[1], a[3])])
    assert disk.clear() == 3 and not log.exists()
