"""LMCacheEngine.store_layer / retrieve_layer (lmcache.engine.layerwise) over real parts:
ChunkedTokenDatabase, CPUMemoryAllocator, LocalCPUBackend (and LocalDiskBackend), StorageManager
and VLLMPagedMemLayerwiseGPUConnector (torch path) on CPU paged caches."""

from __future__ import annotations

import logging

import pytest
import torch

from lmcache.engine.layerwise import drain
from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.cupy_kernels import cupy_available
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_layerwise import VLLMPagedMemLayerwiseGPUConnector
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.keys import LayerCacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

C, L, H, D, N, BLOCKS = 4, 3, 2, 8, 4, 16  # chunk, layers, heads, head size, block, blocks
DTYPE = torch.bfloat16
OBJ_BYTES = 256  # one [4, 2, 16] bf16 KV_T2D object (the allocator's alignment, also for MLA)
POISON = -3.0


class Rig:
    """A layerwise engine wired from real components; ``close`` checks nothing leaked."""

    def __init__(self, objs_of_memory=120, kind="cpu_packed", disk=None):
        mla = kind == "mla"
        heads, size = (1, 2 * D) if mla else (H, D)
        self.meta = LMCacheMetadata("org/model", 1, 0, DTYPE, (L, 1 if mla else 2, C, heads, size),
                                    use_mla=mla)
        self.layout = KVCacheLayout(kind, N, heads, size)
        self.allocator = CPUMemoryAllocator(objs_of_memory * OBJ_BYTES)
        self.backend = LocalCPUBackend(self.allocator, LRUCachePolicy(), max_local_cpu_size=1.0)
        tiers = [self.backend]
        if disk is not None:
            self.disk = LocalDiskBackend(self.backend, LRUCachePolicy(), local_disk=str(disk),
                                         max_local_disk_size=0.01)
            tiers.append(self.disk)
        self.conn = VLLMPagedMemLayerwiseGPUConnector(self.meta, self.layout, backend="torch")
        self.engine = LMCacheEngine(self.meta, ChunkedTokenDatabase(self.meta, C), self.conn,
                                    StorageManager(tiers))

    def shape(self):
        n, h, d = self.layout.block_size, self.layout.num_kv_heads, self.layout.head_size
        return {"legacy_5d": (2, BLOCKS, n, h, d), "mla": (BLOCKS, n, d)}.get(
            self.layout.kind, (BLOCKS, h, n, 2 * d))

    def random_cache(self, seed):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(self.shape(), generator=gen).to(DTYPE) for _ in range(L)]

    def poisoned_cache(self):
        return [torch.full(self.shape(), POISON, dtype=DTYPE) for _ in range(L)]

    def kv(self, cache, layer, slots):
        """KV of ``layer`` at ``slots``: ``[kv, T, H*D]``."""
        return gather_kv([cache[layer]], torch.as_tensor(slots), self.layout)[:, 0]

    def layer_keys(self, toks):
        return [[k for k in key.split_layers(L)]
                for _, _, key in self.engine.token_database.process_tokens(toks)]

    def close(self):
        self.engine.close()
        assert self.allocator.num_active_allocations == 0


def same(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def slots_for(n, seed):
    """n distinct slots, skipping block 0 (vLLM's null block)."""
    return torch.randperm(BLOCKS * N - N, generator=torch.Generator().manual_seed(seed))[:n] + N


def tokens(n, seed=0):
    return torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["cpu_packed", "flash_packed", "legacy_5d", "mla"])
def test_store_layer_then_retrieve_layer_is_bit_exact_layer_by_layer(kind):
    r = Rig(kind=kind)
    toks, src, src_slots = tokens(14), r.random_cache(1), slots_for(14, 1)
    gen = r.engine.store_layer(toks, kvcaches=src, slot_mapping=src_slots)
    assert r.allocator.num_active_allocations == 0  # nothing happens before the first next()
    assert next(gen).layer_id == 0
    assert r.allocator.num_active_allocations == 3 * L  # every (chunk, layer) up front
    assert [next(gen).layer_id for _ in range(L - 1)] == list(range(1, L))
    assert len(r.backend) == 0  # nothing is put before the final step
    assert next(gen) == 12 and next(gen, "end") == "end"
    keys = r.layer_keys(toks)
    assert set(r.backend.keys()) == {k for row in keys for k in row}
    assert all(isinstance(k, LayerCacheEngineKey) for k in r.backend.keys())
    assert keys[1][2].to_string().endswith(f"@bfloat16@2") and len(r.backend) == 3 * L
    # each stored object is KV_T2D [T, 2, H*D] (MLA [T, 1, D]) of its chunk and layer
    obj = r.backend.hot_cache[keys[1][2]]
    assert obj.fmt == MemoryFormat.KV_T2D and obj.shape == r.conn.get_shape(4)
    assert same(obj.tensor, r.kv(src, 2, src_slots[4:8]).transpose(0, 1))
    assert r.engine.lookup(toks) == 12

    dst, dst_slots = r.poisoned_cache(), slots_for(14, 2)
    gen = r.engine.retrieve_layer(toks, kvcaches=dst, slot_mapping=dst_slots)
    assert next(gen) == 12  # lookup + get; nothing loaded yet
    assert bool((r.kv(dst, 0, dst_slots) == POISON).all())
    for layer in range(L):
        assert next(gen).layer_id == layer
        for other in range(L):
            got = r.kv(dst, other, dst_slots[:12])
            if other <= layer:
                assert same(got, r.kv(src, other, src_slots[:12]))
            else:
                assert bool((got == POISON).all())
    ret = next(gen)
    assert ret.dtype == torch.bool and ret.tolist() == [True] * 12 + [False] * 2
    assert next(gen, "end") == "end"
    untouched = sorted(set(range(BLOCKS * N)) - set(dst_slots[:12].tolist()))
    assert all(bool((r.kv(dst, layer, untouched) == POISON).all()) for layer in range(L))
    assert [o.get_ref_count() for o in r.backend.hot_cache.values()] == [1] * (3 * L)
    assert r.engine.stats.value("retrieve_hit_tokens") == 12
    assert r.engine.stats.value("stored_tokens") == 12
    r.close()


def test_each_store_step_reads_its_layer_when_it_runs():
    """As in vLLM: layer i's KV exists in the paged cache when save_kv_layer(i) runs."""
    r = Rig()
    toks, real, slots = tokens(8), r.random_cache(2), slots_for(8, 2)
    src = r.poisoned_cache()
    gen = r.engine.store_layer(toks, kvcaches=src, slot_mapping=slots)
    for layer in range(L):
        src[layer].copy_(real[layer])
        next(gen)
        src[layer].fill_(POISON)  # written over after its step: the store must not see it
    assert next(gen) == 8
    dst = r.poisoned_cache()
    assert drain(r.engine.retrieve_layer(toks, kvcaches=dst, slot_mapping=slots)).all()
    assert all(same(r.kv(dst, layer, slots), r.kv(real, layer, slots)) for layer in range(L))
    r.close()


def test_chunk_counts_only_with_every_layer_and_pins_follow():
    r = Rig()
    toks, src, slots = tokens(16), r.random_cache(3), slots_for(16, 3)
    assert r.engine.store(toks, kvcaches=src, slot_mapping=slots) == 16  # runs the layerwise path
    keys = r.layer_keys(toks)
    assert r.backend.remove(keys[2][1])  # a middle layer of chunk 2 is gone; layers 0, L-1 stay
    assert r.engine.lookup(toks) == 8
    assert r.engine.lookup(toks, pin=True, lookup_id="req") == 8
    pinned = {k for k, o in r.backend.hot_cache.items() if o.is_pinned}
    assert pinned == set(keys[0] + keys[1])  # chunk 2's present layers were unpinned again
    dst = r.poisoned_cache()
    gen = r.engine.retrieve_layer(toks, kvcaches=dst, slot_mapping=slots, req_id="req")
    assert next(gen) == 8
    ret = drain(gen)
    assert ret.tolist() == [True] * 8 + [False] * 8
    assert all(same(r.kv(dst, layer, slots[:8]), r.kv(src, layer, slots[:8])) for layer in range(L))
    assert all(bool((r.kv(dst, layer, slots[8:]) == POISON).all()) for layer in range(L))
    assert not any(o.is_pinned for o in r.backend.hot_cache.values())
    assert r.engine.stats.value("pinned_lookups") == 0
    # the store fills the hole: chunks 0, 1 are skipped, chunk 2 is stored again (all layers)
    assert r.engine.store(toks, kvcaches=src, slot_mapping=slots) == 4
    assert r.engine.stats.value("store_skipped_tokens") == 12
    assert r.engine.lookup(toks) == 16 and len(r.backend) == 4 * L
    r.close()


def test_memory_for_part_stores_whole_chunks_that_fit(caplog):
    r = Rig(objs_of_memory=2 * L + 1)  # two chunks and one layer of a third
    src, slots = r.random_cache(4), slots_for(16, 4)
    with caplog.at_level(logging.WARNING, logger="lmcache.engine.lmcache_engine"):
        gen = r.engine.store_layer(tokens(16, 1), kvcaches=src, slot_mapping=slots)
        next(gen)
        assert r.allocator.num_active_allocations == 2 * L  # the third chunk's layer 0 released
        assert drain(gen) == 8
        # a second sequence evicts the first (unpinned) one and again fits two chunks
        assert r.engine.store(tokens(16, 2), kvcaches=src, slot_mapping=slots) == 8
    assert len(r.backend) == 2 * L and r.allocator.num_active_allocations == 2 * L
    stats = r.engine.stats
    assert stats.value("failed_stores") == 2 and stats.value("failed_store_tokens") == 16
    assert len([rec for rec in caplog.records if "no memory" in rec.getMessage()]) == 1
    assert r.engine.lookup(tokens(16, 2)) == 8 and r.engine.lookup(tokens(16, 1)) == 0
    dst = r.poisoned_cache()
    assert drain(r.engine.retrieve_layer(tokens(16, 2), kvcaches=dst, slot_mapping=slots)
                 ).tolist() == [True] * 8 + [False] * 8
    assert all(same(r.kv(dst, layer, slots[:8]), r.kv(src, layer, slots[:8])) for layer in range(L))
    r.close()


def test_abandoned_generators_release_memory_and_pins():
    r = Rig()
    toks, src, slots = tokens(8), r.random_cache(5), slots_for(8, 5)
    assert r.engine.store(toks, kvcaches=src, slot_mapping=slots) == 8
    assert r.engine.lookup(toks, pin=True, lookup_id=7) == 8
    gen = r.engine.retrieve_layer(toks, kvcaches=r.poisoned_cache(), slot_mapping=slots,
                                  lookup_id=7)
    next(gen), next(gen)  # got every layer, loaded layer 0
    assert [o.get_ref_count() for o in r.backend.hot_cache.values()] == [2] * (2 * L)
    gen.close()
    assert [o.get_ref_count() for o in r.backend.hot_cache.values()] == [1] * (2 * L)
    assert not any(o.is_pinned for o in r.backend.hot_cache.values())
    gen = r.engine.store_layer(tokens(8, 9), kvcaches=src, slot_mapping=slots)
    next(gen)
    assert r.allocator.num_active_allocations == 4 * L
    del gen  # garbage collection closes it: its objects go back, nothing is put
    assert r.allocator.num_active_allocations == 2 * L and len(r.backend) == 2 * L
    r.close()


def test_bad_input_raises_and_leaks_nothing():
    r = Rig()
    toks, src, slots = tokens(8), r.random_cache(6), slots_for(8, 6)
    with pytest.raises(ValueError, match="3 tokens, not a multiple of chunk_size 4"):
        r.engine.store_layer(toks, torch.tensor([False] * 3 + [True] * 5), kvcaches=src,
                             slot_mapping=slots)  # checked at the call, before any next()
    gen = r.engine.store_layer(toks, kvcaches=src, slot_mapping=slots.clone().fill_(BLOCKS * N))
    with pytest.raises(ValueError, match=r"valid slots are \[0, 63\]"):
        next(gen)
    assert r.allocator.num_active_allocations == 0 and len(r.backend) == 0
    assert r.engine.store(toks, kvcaches=src, slot_mapping=slots) == 8
    assert r.engine.lookup(toks, pin=True, lookup_id="x") == 8
    with pytest.raises(ValueError, match=r"kvcaches\[0\].*torch.float16"):
        r.engine.retrieve_layer(toks, kvcaches=[t.half() for t in src], slot_mapping=slots,
                                lookup_id="x")
    assert not any(o.is_pinned for o in r.backend.hot_cache.values())  # released on error
    with pytest.raises(TypeError, match="layerwise gpu_connector"):
        LMCacheEngine(r.meta, ChunkedTokenDatabase(r.meta, C),
                      VLLMPagedMemGPUConnectorV2(r.meta, r.layout),
                      r.engine.storage_manager).store_layer(toks, kvcaches=src, slot_mapping=slots)
    r.close()


def test_layers_come_from_the_disk_tier_after_the_cpu_tier_lost_them(tmp_path):
    r = Rig(disk=tmp_path / "disk")
    toks, src, slots = tokens(8), r.random_cache(7), slots_for(8, 7)
    assert r.engine.store(toks, kvcaches=src, slot_mapping=slots) == 8
    assert r.disk.flush(timeout=60)
    names = sorted(p.name for p in (tmp_path / "disk").rglob("*.kvc") if p.is_file())
    assert len(names) == 2 * L
    keys = r.layer_keys(toks)
    r.backend.remove(keys[0][1]), r.backend.remove(keys[1][0])  # mixed tiers per chunk
    assert r.engine.lookup(toks) == 8
    dst = r.poisoned_cache()
    assert drain(r.engine.retrieve_layer(toks, kvcaches=dst, slot_mapping=slots)).all()
    assert all(same(r.kv(dst, layer, slots), r.kv(src, layer, slots)) for layer in range(L))
    assert keys[0][1] in r.backend.hot_cache  # written back into the CPU tier
    r.close()


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and cupy_available()), reason="needs CUDA and CuPy")
@pytest.mark.parametrize("kind", ["flash_packed", "mla"])
def test_cuda_kernel_path_is_bit_exact_and_ordered_with_compute(kind):
    """The CuPy kernels, pinned MemoryObjs and the copy streams under store_layer/retrieve_layer:
    each step sees the layer the compute stream wrote before it, each load lands before compute
    that waits on its LayerTransfer reads the layer."""
    mla, layers, block, blocks, chunk = kind == "mla", 4, 16, 64, 256
    heads, size = (1, 64) if mla else (8, 128)
    meta = LMCacheMetadata("m", 1, 0, DTYPE, (layers, 1 if mla else 2, chunk, heads, size),
                           use_mla=mla)
    layout = KVCacheLayout(kind, block, heads, size)
    allocator = CPUMemoryAllocator(64 << 20)  # pinned: CUDA is present
    backend = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=1.0)
    engine = LMCacheEngine(meta, ChunkedTokenDatabase(meta, chunk),
                           VLLMPagedMemLayerwiseGPUConnector(meta, layout, backend="cupy"),
                           StorageManager([backend]))
    shape = (blocks, block, size) if mla else (blocks, heads, block, 2 * size)
    gen = torch.Generator(device="cuda").manual_seed(0)
    real = [torch.randn(shape, device="cuda", generator=gen).to(DTYPE) for _ in range(layers)]
    perm = torch.randperm(blocks * block, generator=torch.Generator().manual_seed(1))
    src_slots, dst_slots = perm[:700].cuda(), perm[300:1000].cuda()
    toks = tokens(700)
    src = [torch.zeros_like(t) for t in real]
    store = engine.store_layer(toks, kvcaches=src, slot_mapping=src_slots)
    for layer in range(layers):
        torch.cuda._sleep(20_000_000)  # the "forward pass" writes this layer late
        src[layer].copy_(real[layer])
        next(store)
    assert next(store) == 512  # two whole chunks; the partial one is not saved
    dst = [torch.full_like(t, POISON) for t in real]
    load = engine.retrieve_layer(toks, kvcaches=dst, slot_mapping=dst_slots)
    assert next(load) == 512
    seen = []
    for layer in range(layers):
        next(load).wait_on()  # the compute stream waits for the layer, the host does not
        seen.append(gather_kv([dst[layer]], dst_slots[:512], layout).clone())  # "attention"
    assert next(load).tolist() == [True] * 512 + [False] * 188
    for layer in range(layers):
        want = gather_kv([real[layer]], src_slots[:512], layout)
        assert same(seen[layer], want)
        assert same(gather_kv([dst[layer]], dst_slots[:512], layout), want)
    engine.close()
    assert allocator.num_active_allocations == 0
