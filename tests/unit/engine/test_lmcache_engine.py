"""LMCacheEngine over real parts: ChunkedTokenDatabase, CPUMemoryAllocator, LocalCPUBackend,
StorageManager and VLLMPagedMemGPUConnectorV2 on CPU paged caches."""

from __future__ import annotations

import logging

import pytest
import torch

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

C, L, H, D, N, BLOCKS = 4, 2, 2, 8, 4, 16  # chunk, layers, heads, head size, block, blocks
DTYPE = torch.bfloat16
CHUNK_BYTES = 2 * L * C * H * D * 2  # one [2, L, C, H*D] bf16 chunk = 512 bytes
POISON = -3.0


class Rig:
    """One engine wired from real components; ``close`` checks nothing leaked."""

    def __init__(self, chunks_of_memory=64, save_unfull_chunk=False, kind="cpu_packed"):
        mla = kind == "mla"
        heads, size = (1, 2 * D) if mla else (H, D)
        self.meta = LMCacheMetadata("org/model", 1, 0, DTYPE, (L, 1 if mla else 2, C, heads, size),
                                    use_mla=mla)
        self.layout = KVCacheLayout(kind, N, heads, size)
        self.allocator = CPUMemoryAllocator(chunks_of_memory * CHUNK_BYTES)
        self.backend = LocalCPUBackend(self.allocator, LRUCachePolicy(), max_local_cpu_size=1.0)
        self.engine = LMCacheEngine(
            self.meta,
            ChunkedTokenDatabase(self.meta, C, save_unfull_chunk=save_unfull_chunk),
            VLLMPagedMemGPUConnectorV2(self.meta, self.layout),
            StorageManager([self.backend]),
        )

    def shape(self):
        n, h, d = self.layout.block_size, self.layout.num_kv_heads, self.layout.head_size
        return (BLOCKS, n, d) if self.layout.is_mla else (BLOCKS, h, n, 2 * d)

    def random_cache(self, seed):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(self.shape(), generator=gen).to(DTYPE) for _ in range(L)]

    def poisoned_cache(self):
        return [torch.full(self.shape(), POISON, dtype=DTYPE) for _ in range(L)]

    def kv(self, cache, slots):
        return gather_kv(cache, torch.as_tensor(slots), self.layout)

    def close(self):
        self.engine.close()
        assert self.allocator.num_active_allocations == 0


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def slots_for(n, seed):
    """n distinct slots, skipping block 0 (vLLM's null block)."""
    return torch.randperm(BLOCKS * N - N, generator=torch.Generator().manual_seed(seed))[:n] + N


def tokens(n, seed=0):
    return torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["cpu_packed", "flash_packed", "mla"])
def test_store_then_retrieve_into_other_slots_is_bit_exact(kind):
    r = Rig(kind=kind)
    toks, src, src_slots = tokens(14), r.random_cache(1), slots_for(14, 1)
    assert r.engine.store(toks, kvcaches=src, slot_mapping=src_slots) == 12  # no partial chunk
    assert r.engine.stats.value("stored_tokens") == 12
    dst, dst_slots = r.poisoned_cache(), slots_for(14, 2)
    ret = r.engine.retrieve(toks, kvcaches=dst, slot_mapping=dst_slots)
    assert ret.dtype == torch.bool and ret.tolist() == [True] * 12 + [False] * 2
    got, want = r.kv(dst, dst_slots[:12]), r.kv(src, src_slots[:12])
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    untouched = sorted(set(range(BLOCKS * N)) - set(dst_slots[:12].tolist()))
    assert bool((r.kv(dst, untouched) == POISON).all())
    assert r.engine.stats.value("retrieve_hit_tokens") == 12
    assert r.engine.store(toks, kvcaches=src, slot_mapping=src_slots) == 0  # already cached
    assert r.engine.stats.value("store_skipped_tokens") == 12
    assert [o.get_ref_count() for o in r.backend.hot_cache.values()] == [1, 1, 1]
    r.engine.clear()
    assert r.allocator.num_active_allocations == 0 and len(r.backend) == 0
    r.close()


def test_offset_and_padding_in_slot_mapping(rig):
    toks, src = tokens(12), rig.random_cache(3)
    src_slots = slots_for(12, 3)
    # slot_mapping covers tokens [4, 12) only; tokens [0, 4) are not in the paged cache
    mask = torch.tensor([False] * 4 + [True] * 8)
    assert rig.engine.store(toks, mask, kvcaches=src, slot_mapping=src_slots[4:], offset=4) == 8
    dst, dst_slots = rig.poisoned_cache(), slots_for(12, 4).clone()
    dst_slots[9] = -1  # padding: token 9 is not written
    ret = rig.engine.retrieve(toks, mask, kvcaches=dst, slot_mapping=dst_slots)
    assert ret.tolist() == [False] * 4 + [True] * 8
    keep = [i for i in range(4, 12) if i != 9]
    assert torch.equal(rig.kv(dst, dst_slots[keep]), rig.kv(src, src_slots[keep]))
    assert bool((rig.kv(dst, [slots_for(12, 4)[9]]) == POISON).all())


def test_masks_skip_chunks_and_reject_bad_prefix(rig):
    toks, src, slots = tokens(12), rig.random_cache(5), slots_for(12, 5)
    store_mask = torch.tensor([False] * 4 + [True] * 8)
    assert rig.engine.store(toks, store_mask, kvcaches=src, slot_mapping=slots) == 8
    assert rig.engine.lookup(toks) == 0  # chunk 0 missing ends the prefix
    dst = rig.poisoned_cache()
    ret = rig.engine.retrieve(toks, kvcaches=dst, slot_mapping=slots)
    assert not bool(ret.any())  # no mask: chunk 0 is a miss, nothing after it loads
    ret = rig.engine.retrieve(toks, store_mask, kvcaches=dst, slot_mapping=slots)
    assert ret.tolist() == [False] * 4 + [True] * 8
    assert torch.equal(rig.kv(dst, slots[4:]), rig.kv(src, slots[4:]))
    bad = torch.tensor([False] * 3 + [True] * 9)
    with pytest.raises(ValueError, match="3 tokens, not a multiple of chunk_size 4"):
        rig.engine.store(toks, bad, kvcaches=src, slot_mapping=slots)
    with pytest.raises(ValueError, match="3 tokens, not a multiple of chunk_size 4"):
        rig.engine.retrieve(toks, bad, kvcaches=dst, slot_mapping=slots)


def test_partial_hit_gives_true_prefix_only(rig):
    toks, src, slots = tokens(16), rig.random_cache(6), slots_for(16, 6)
    assert rig.engine.store(toks[:8], kvcaches=src, slot_mapping=slots[:8]) == 8
    assert rig.engine.lookup(toks) == 8
    dst = rig.poisoned_cache()
    ret = rig.engine.retrieve(toks, kvcaches=dst, slot_mapping=slots)
    assert ret.tolist() == [True] * 8 + [False] * 8
    assert bool((rig.kv(dst, slots[8:]) == POISON).all())
    assert rig.engine.stats.value("retrieve_requested_tokens") == 16
    assert rig.engine.stats.value("retrieve_hit_tokens") == 8


def test_memory_for_part_stores_prefix_and_counts_failure(caplog):
    r = Rig(chunks_of_memory=2)
    src, slots = r.random_cache(7), slots_for(16, 7)
    with caplog.at_level(logging.WARNING, logger="lmcache.engine.lmcache_engine"):
        assert r.engine.store(tokens(16, 1), kvcaches=src, slot_mapping=slots) == 8
        # a second sequence evicts the first (unpinned) one and again fits only two chunks
        assert r.engine.store(tokens(16, 2), kvcaches=src, slot_mapping=slots) == 8
    stats = r.engine.stats
    assert stats.value("failed_stores") == 2 and stats.value("failed_store_tokens") == 16
    assert stats.value("stored_tokens") == 16
    assert len([rec for rec in caplog.records if "no memory" in rec.getMessage()]) == 1
    assert r.engine.lookup(tokens(16, 2)) == 8 and r.engine.lookup(tokens(16, 1)) == 0
    r.close()


def test_lookup_pins_until_unpin_or_retrieve():
    r = Rig(chunks_of_memory=3, save_unfull_chunk=True)
    src, slots = r.random_cache(8), slots_for(10, 8)
    a, b = tokens(10, 1), tokens(10, 2)
    assert r.engine.store(a, kvcaches=src, slot_mapping=slots) == 10  # 4 + 4 + 2
    assert r.engine.lookup(a, pin=True, lookup_id="req-a") == 10
    assert all(o.is_pinned for o in r.backend.hot_cache.values())
    assert r.engine.stats.value("pinned_lookups") == 1
    assert r.engine.store(b, kvcaches=src, slot_mapping=slots) == 0  # pinned: not evictable
    assert r.engine.stats.value("failed_store_tokens") == 10
    r.engine.lookup_unpin("req-a")
    assert not any(o.is_pinned for o in r.backend.hot_cache.values())
    assert r.engine.stats.value("pinned_lookups") == 0
    assert r.engine.store(b, kvcaches=src, slot_mapping=slots) == 10  # evicts a's chunks now
    assert r.engine.lookup(b, pin=True, lookup_id="req-b") == 10
    ret = r.engine.retrieve(b, kvcaches=r.poisoned_cache(), slot_mapping=slots, req_id="req-b")
    assert bool(ret.all()) and not any(o.is_pinned for o in r.backend.hot_cache.values())
    r.engine.lookup_unpin("never-seen")  # unknown ids are ignored
    with pytest.raises(ValueError, match="needs a lookup_id"):
        r.engine.lookup(b, pin=True)
    r.close()


def test_close_releases_pins_and_memory():
    r = Rig()
    toks, src, slots = tokens(8), r.random_cache(9), slots_for(8, 9)
    r.engine.store(toks, kvcaches=src, slot_mapping=slots)
    assert r.engine.lookup(toks, pin=True, lookup_id=7) == 8
    r.close()  # unpins, drops the tier's refs; allocator empty (asserted in close)
    r.engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        r.engine.lookup(toks)


def test_kvcache_shape_and_dtype_mismatch_errors(rig):
    toks, slots = tokens(8), slots_for(8, 10)
    half = [t.to(torch.float16) for t in rig.random_cache(10)]
    with pytest.raises(ValueError, match=r"kvcaches\[0\].*dtype torch.float16.*torch.bfloat16"):
        rig.engine.store(toks, kvcaches=half, slot_mapping=slots)
    with pytest.raises(ValueError, match="kvcaches has 1 layers, metadata kv_shape"):
        rig.engine.retrieve(toks, kvcaches=rig.random_cache(10)[:1], slot_mapping=slots)
    wrong = [torch.zeros(BLOCKS, H, N, D, dtype=DTYPE) for _ in range(L)]
    expected = r"shape \(16, 2, 4, 8\).*expected \[num_blocks, 2, 4, 16\]"
    with pytest.raises(ValueError, match=expected):
        rig.engine.store(toks, kvcaches=wrong, slot_mapping=slots)
    with pytest.raises(ValueError, match=r"slots in \[64, 64\]; valid slots are \[0, 63\]"):
        rig.engine.store(toks, kvcaches=rig.random_cache(10), slot_mapping=slots.clone().fill_(64))
    assert rig.allocator.num_active_allocations == 0 and len(rig.backend) == 0


def test_tags_and_mismatched_tier_object_is_a_miss(rig):
    toks, src, slots = tokens(8), rig.random_cache(11), slots_for(8, 11)
    tagged = {"lmcache.tag.user": "alice"}
    assert rig.engine.store(toks, kvcaches=src, slot_mapping=slots, request_configs=tagged) == 8
    assert rig.engine.lookup(toks) == 0
    assert rig.engine.lookup(toks, request_configs=tagged) == 8
    # plant an object of the wrong shape under chunk 1's untagged key: retrieve must stop there
    keys = [k for _, _, k in rig.engine.token_database.process_tokens(toks)]
    rig.engine.store(toks[:4], kvcaches=src, slot_mapping=slots[:4])
    bogus = rig.engine.storage_manager.allocate((2, L, 3, H * D), DTYPE, MemoryFormat.KV_2LTD)
    bogus.tensor.zero_()
    rig.engine.storage_manager.batched_put([keys[1]], [bogus])
    assert rig.engine.lookup(toks) == 8
    ret = rig.engine.retrieve(toks, kvcaches=rig.poisoned_cache(), slot_mapping=slots)
    assert ret.tolist() == [True] * 4 + [False] * 4
