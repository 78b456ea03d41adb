"""PullMemory over a real LocalCPUBackend: allocation ahead of the peer's answer in the last
pull's layout (kept where it matches, freed where it does not, never evicting), layout checks
against this worker's model, and the quarantine of a failed read's memory."""

from __future__ import annotations

import time

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.p2p_memory import PullMemory, free

L, C, H, D = 2, 16, 2, 8  # layers, chunk size, kv heads, head size: a chunk is [2, 2, 16, 16]
FULL = [2, L, C, H * D]


def chunk(shape, dtype="float", fmt=MemoryFormat.KV_2LTD):
    n = 1
    for s in shape:
        n *= s
    return [0, n * 4, list(shape), dtype, int(fmt)]


@pytest.fixture
def mem(cpu):
    md = LMCacheMetadata("m", 1, 0, torch.float32, (L, 2, C, H, D))
    return PullMemory(cpu, md, {"layout_mismatches": 0})


def test_no_guess_before_the_first_pull_then_the_last_layout(mem, cpu):
    assert mem.guess(4) == []
    objs = mem.allocate([chunk(FULL), chunk(FULL)], [])
    assert [list(o.shape) for o in objs] == [FULL, FULL]
    free(objs)
    guess = mem.guess(3)
    assert [list(o.shape) for o in guess] == [FULL] * 3
    ptrs = [g.tensor.data_ptr() for g in guess]
    # the peer holds 2 chunks, the second a partial one: the first guess is used, the rest freed
    objs = mem.allocate([chunk(FULL), chunk([2, L, 5, H * D])], guess)
    assert [list(o.shape) for o in objs] == [FULL, [2, L, 5, H * D]]
    assert objs[0].tensor.data_ptr() == ptrs[0]
    assert cpu.allocator.num_active_allocations == 2
    free(objs)
    assert cpu.allocator.num_active_allocations == 0


def test_unexpected_layouts_end_the_prefix_and_are_counted(mem, cpu):
    bad = [chunk([2, L + 1, C, H * D]), chunk(FULL, dtype="bfloat16"),
           chunk([2, L, C + 1, H * D])]
    got = [mem.allocate([chunk(FULL), b, chunk(FULL)], mem.guess(3)) for b in bad]
    assert [len(objs) for objs in got] == [1, 1, 1]  # the prefix before the bad chunk
    assert mem.stats["layout_mismatches"] == 3
    assert cpu.allocator.num_active_allocations == 3  # the unused guesses were freed
    with pytest.raises(ValueError):
        mem.allocate([chunk(FULL, dtype="no-such-dtype")], mem.guess(2))
    assert cpu.allocator.num_active_allocations == 3  # the guesses were freed
    for objs in got:
        free(objs)


def test_guesses_never_evict(mem, cpu):
    free(mem.allocate([chunk(FULL)], []))
    per = cpu.allocator.reserved_size(FULL, torch.float32)
    stored = 0
    while cpu.allocator.used_bytes + per <= cpu.max_bytes:  # fill the tier with stored chunks
        obj = cpu.allocate(FULL, torch.float32)
        cpu.put(CacheEngineKey("m", 1, 0, stored, torch.float32), obj)
        obj.ref_count_down()
        stored += 1
    assert mem.guess(2) == [] and len(cpu) == stored
    objs = mem.allocate([chunk(FULL)], [])  # after the answer: allocated as the tier does
    assert len(objs) == 1 and len(cpu) == stored - 1
    free(objs)


def test_quarantined_memory_is_freed_when_due(mem, cpu):
    free(mem.allocate([chunk(FULL)], []))
    a, b = mem.guess(1), mem.guess(1)
    mem.quarantine(a, 0.05)
    mem.quarantine(b, 60.0)
    mem.purge()
    assert cpu.allocator.num_active_allocations == 2
    time.sleep(0.06)
    mem.purge()
    assert cpu.allocator.num_active_allocations == 1
    mem.purge(everything=True)
    assert cpu.allocator.num_active_allocations == 0
