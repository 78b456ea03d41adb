"""The engine's pipelined store and per-request hash cache (issue 14), over real parts on CPU:
ChunkedTokenDatabase (its ``num_hashed_chunks`` counter), CPUMemoryAllocator, a LocalCPUBackend
that counts its allocation calls, StorageManager, VLLMPagedMemGPUConnectorV2 (torch path)."""

from __future__ import annotations

import torch

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.engine.store_path import GROUP_CHUNKS
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

C, L, H, D, N, BLOCKS = 4, 2, 2, 8, 4, 64
DTYPE = torch.bfloat16
CHUNK_BYTES = 2 * L * C * H * D * 2


class CountingCPUBackend(LocalCPUBackend):
    """LocalCPUBackend that records each allocation call (a collaborator the test injects)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int]] = []

    def allocate(self, shape, dtype, fmt=None, evict=True):
        self.calls.append(("allocate", 1))
        return super().allocate(shape, dtype, fmt, evict) if fmt else super().allocate(shape, dtype)

    def batched_allocate(self, shape, dtype, n, fmt=None):
        self.calls.append(("batched_allocate", n))
        return super().batched_allocate(shape, dtype, n, fmt)


class Rig:
    def __init__(self, chunks_of_memory=256, save_unfull_chunk=False):
        self.meta = LMCacheMetadata("org/model", 1, 0, DTYPE, (L, 2, C, H, D))
        self.layout = KVCacheLayout("cpu_packed", N, H, D)
        self.allocator = CPUMemoryAllocator(chunks_of_memory * CHUNK_BYTES)
        self.backend = CountingCPUBackend(self.allocator, LRUCachePolicy(), max_local_cpu_size=1.0)
        self.db = ChunkedTokenDatabase(self.meta, C, save_unfull_chunk=save_unfull_chunk)
        self.engine = LMCacheEngine(self.meta, self.db,
                                    VLLMPagedMemGPUConnectorV2(self.meta, self.layout),
                                    StorageManager([self.backend]))
        gen = torch.Generator().manual_seed(0)
        self.cache = [torch.randn(BLOCKS, H, N, 2 * D, generator=gen).to(DTYPE) for _ in range(L)]

    def slots(self, n, seed):
        perm = torch.randperm(BLOCKS * N - N, generator=torch.Generator().manual_seed(seed))
        return perm[:n] + N

    def close(self):
        self.engine.close()
        assert self.allocator.num_active_allocations == 0


def toks(n, seed=0):
    return torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed))


def test_a_request_is_hashed_once_by_lookup_retrieve_and_store():
    rig = Rig()
    ids, n_chunks = toks(40), 10
    src = rig.slots(40, 1)
    assert rig.engine.lookup(ids, lookup_id="r1") == 0
    assert rig.db.num_hashed_chunks == n_chunks
    mask = rig.engine.retrieve(ids, kvcaches=rig.cache, slot_mapping=src, lookup_id="r1")
    assert int(mask.sum()) == 0
    assert rig.engine.store(ids, kvcaches=rig.cache, slot_mapping=src, req_id="r1") == 40
    assert rig.engine.lookup(ids, lookup_id="r1") == 40
    assert rig.db.num_hashed_chunks == n_chunks  # lookup, retrieve, store, lookup: hashed once
    # decode grows the request by 8 tokens: only the 2 new chunks are hashed
    longer = torch.cat([ids, toks(8, seed=5)])
    more = torch.cat([src, rig.slots(48, 2)[40:]])
    assert rig.engine.store(longer, kvcaches=rig.cache, slot_mapping=more, req_id="r1") == 8
    assert rig.db.num_hashed_chunks == n_chunks + 2
    # a call without a request id hashes everything again
    assert rig.engine.lookup(longer) == 48
    assert rig.db.num_hashed_chunks == 2 * n_chunks + 4
    rig.close()


def test_cached_hashes_equal_fresh_ones_and_a_changed_prompt_is_rehashed():
    rig = Rig()
    fresh = ChunkedTokenDatabase(rig.meta, C)
    ids = toks(64)
    list(rig.db.process_tokens(ids, request_id="a"))
    assert rig.db.num_hashed_chunks == 16
    changed = ids.clone()
    changed[41] += 1  # chunk 10 differs: chunks 0-9 are reused, 10-15 hashed again
    got = list(rig.db.process_tokens(changed, request_id="a"))
    assert rig.db.num_hashed_chunks == 16 + 6
    assert got == list(fresh.process_tokens(changed))
    # the caller's tensor changing later does not poison the cache
    changed[0] += 1
    assert list(rig.db.process_tokens(changed, request_id="a")) == list(fresh.process_tokens(changed))
    # a shorter call (a retrieve of the first chunks) keeps the longer cached chain
    before = rig.db.num_hashed_chunks
    assert list(rig.db.process_tokens(changed[:20], request_id="a")) == \
        list(fresh.process_tokens(changed[:20]))
    list(rig.db.process_tokens(changed, request_id="a"))
    assert rig.db.num_hashed_chunks == before
    # masks and request tags work on cached chains
    mask = torch.ones(64, dtype=torch.bool)
    mask[:8] = False
    cfg = {"lmcache.tag.user": "x"}
    assert list(rig.db.process_tokens(changed, mask, request_configs=cfg, request_id="a")) == \
        list(fresh.process_tokens(changed, mask, request_configs=cfg))
    rig.db.forget("a")
    list(rig.db.process_tokens(changed, request_id="a"))
    assert rig.db.num_hashed_chunks == before + 16
    rig.close()


def test_request_cache_is_bounded_in_tokens():
    meta = LMCacheMetadata("m", 1, 0, DTYPE, (L, 2, C, H, D))
    db = ChunkedTokenDatabase(meta, C, request_cache_tokens=64)
    for i in range(5):
        list(db.process_tokens(toks(32, seed=i), request_id=i))
    assert db._cached_tokens <= 64 and len(db._requests) == 2
    assert list(db._requests) == [3, 4]  # least recently used dropped first


def test_store_allocates_each_copy_group_in_one_call_and_stores_right_bytes():
    rig = Rig()
    n = 4 * 40 + 2  # 40 full chunks and a partial one (not stored: save_unfull_chunk off)
    ids, src, dst = toks(n), rig.slots(n, 1), rig.slots(n, 2)
    assert rig.engine.store(ids, kvcaches=rig.cache, slot_mapping=src) == 160
    sizes, left = [], 40
    for g in GROUP_CHUNKS + (GROUP_CHUNKS[-1],) * 4:
        if left:
            sizes.append(min(g, left))
            left -= sizes[-1]
    assert rig.backend.calls == [("batched_allocate", k) for k in sizes]
    target = [torch.zeros_like(t) for t in rig.cache]
    mask = rig.engine.retrieve(ids, kvcaches=target, slot_mapping=dst)
    assert int(mask.sum()) == 160
    assert torch.equal(gather_kv(target, dst[:160], rig.layout),
                       gather_kv(rig.cache, src[:160], rig.layout))
    rig.close()


def test_partial_chunk_gets_its_own_allocation_and_out_of_memory_stores_a_prefix():
    rig = Rig(save_unfull_chunk=True)
    ids, src = toks(14), rig.slots(14, 1)  # one group: 3 full chunks and one of 2 tokens
    assert rig.engine.store(ids, kvcaches=rig.cache, slot_mapping=src) == 14
    assert rig.backend.calls == [("batched_allocate", 3), ("allocate", 1)]
    rig.close()
    small = Rig(chunks_of_memory=5)
    ids, src = toks(40), small.slots(40, 1)
    assert small.engine.store(ids, kvcaches=small.cache, slot_mapping=src) == 20
    assert small.engine.stats.value("failed_store_tokens") == 20
    assert small.engine.lookup(ids) == 20
    small.close()


def test_store_skips_the_cached_prefix_group_by_group_and_wait_false_on_cpu():
    rig = Rig()
    ids, src = toks(64), rig.slots(64, 1)
    assert rig.engine.store(ids[:36], kvcaches=rig.cache, slot_mapping=src[:36]) == 36
    # 9 chunks cached: the group of 4 present, the group of 8 has 5 present -> 7 new chunks
    assert rig.engine.store(ids, kvcaches=rig.cache, slot_mapping=src, wait=False) == 28
    rig.engine.wait_for_stores()
    assert rig.engine.lookup(ids) == 64
    assert rig.engine.stats.value("store_skipped_tokens") == 36
    rig.close()
