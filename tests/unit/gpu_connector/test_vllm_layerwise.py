"""VLLMPagedMemLayerwiseGPUConnector on the torch path: the generator protocol, KV_T2D round
trips through real MemoryObjs for every layout, and bad input (the CUDA kernel path of the same
class is exercised in test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_layerwise import VLLMPagedMemLayerwiseGPUConnector
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata

N, H, D, L, BLOCKS, MLA_D = 4, 2, 8, 3, 10, 12
KINDS = ["cpu_packed", "flash_packed", "legacy_5d", "mla"]


def setup(kind, dtype=torch.bfloat16, backend="torch"):
    mla = kind == "mla"
    heads, size = (1, MLA_D) if mla else (H, D)
    meta = LMCacheMetadata("m", 1, 0, dtype, (L, 1 if mla else 2, 8, heads, size), use_mla=mla)
    layout = KVCacheLayout(kind, N, heads, size)
    return layout, VLLMPagedMemLayerwiseGPUConnector(meta, layout, backend=backend)


def caches(layout, dtype, fill=None, seed=0):
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    shape = {"legacy_5d": (2, BLOCKS, n, h, d), "mla": (BLOCKS, n, d)}.get(
        layout.kind, (BLOCKS, h, n, 2 * d))
    gen = torch.Generator().manual_seed(seed)
    if fill is not None:
        return [torch.full(shape, fill, dtype=dtype) for _ in range(L)]
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(L)]


def store_all(conn, objs_by_layer, starts, ends, **kw):
    gen = conn.batched_from_gpu(objs_by_layer, starts, ends, **kw)
    seen = [next(gen).layer_id for _ in range(L)]
    assert next(gen, "end") == "end"  # final step: waits, then the generator is exhausted
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_layerwise_store_then_retrieve_round_trip(kind):
    dtype = torch.bfloat16
    layout, conn = setup(kind, dtype)
    assert conn.fmt == MemoryFormat.KV_T2D
    assert conn.get_shape(5) == torch.Size((5, 1 if kind == "mla" else 2, layout.hidden_dim))
    src = caches(layout, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    offset = 2
    src_slots = torch.randperm(BLOCKS * N, generator=gen)[:14]  # tokens 2..15
    starts, ends = [2, 10], [10, 16]
    alloc = CPUMemoryAllocator(1 << 20)
    objs = [[alloc.allocate(conn.get_shape(e - s), dtype, MemoryFormat.KV_T2D)
             for s, e in zip(starts, ends)] for _ in range(L)]
    kw = dict(kvcaches=src, slot_mapping=src_slots, offset=offset)
    assert store_all(conn, objs, starts, ends, **kw) == list(range(L))
    for layer in range(L):  # each object is exactly the reference gather of its layer/chunk
        for obj, s, e in zip(objs[layer], starts, ends):
            want = gather_kv([src[layer]], src_slots[s - offset:e - offset], layout)[:, 0]
            assert torch.equal(obj.tensor, want.transpose(0, 1))

    dst = caches(layout, dtype, fill=5.0)
    dst_slots = torch.randperm(BLOCKS * N, generator=gen)[:14].clone()
    dst_slots[3] = -1  # padding: skipped
    load = conn.batched_to_gpu(None, starts, ends, kvcaches=dst, slot_mapping=dst_slots,
                               offset=offset)
    assert next(load) is None
    for layer in range(L):
        transfer = load.send(objs[layer])
        assert transfer.layer_id == layer
        transfer.wait_on()  # torch path: already done, must not fail
    assert next(load, "end") == "end"
    keep = dst_slots >= 0
    for layer in range(L):
        got = gather_kv([dst[layer]], dst_slots[keep], layout)
        want = gather_kv([src[layer]], src_slots[keep], layout)
        assert torch.equal(got, want)
        untouched = torch.tensor([s for s in range(BLOCKS * N) if s not in set(dst_slots.tolist())])
        assert bool((gather_kv([dst[layer]], untouched, layout) == 5.0).all())
    for row in objs:
        for obj in row:
            obj.ref_count_down()


def test_single_layer_from_and_to_gpu_and_upfront_objects():
    layout, conn = setup("flash_packed", torch.float32)
    src = caches(layout, torch.float32, seed=3)
    slots = torch.tensor([7, 1, 30, 12])
    alloc = CPUMemoryAllocator(1 << 16)
    obj = alloc.allocate(conn.get_shape(4), torch.float32, MemoryFormat.KV_T2D)
    conn.from_gpu(obj, 0, 4, kvcaches=src, slot_mapping=slots, layer_id=2)
    assert torch.equal(obj.tensor, gather_kv([src[2]], slots, layout)[:, 0].transpose(0, 1))
    dst = caches(layout, torch.float32, fill=0.0)
    conn.to_gpu(obj, 0, 4, kvcaches=dst, slot_mapping=slots, layer_id=1)
    assert torch.equal(gather_kv([dst[1]], slots, layout), gather_kv([src[2]], slots, layout))
    assert bool((dst[0] == 0).all()) and bool((dst[2] == 0).all())
    # all layers given up front: prime, then one next() per layer
    dst2 = caches(layout, torch.float32, fill=0.0)
    load = conn.batched_to_gpu([[obj]] * L, [0], [4], kvcaches=dst2, slot_mapping=slots)
    assert next(load) is None
    assert [next(load).layer_id for _ in range(L)] == [0, 1, 2]
    assert next(load, "end") == "end"
    assert all(torch.equal(gather_kv([t], slots, layout), gather_kv([src[2]], slots, layout))
               for t in dst2)
    obj.ref_count_down()


def test_bad_input_is_a_clear_error():
    layout, conn = setup("flash_packed", torch.float32)
    src = caches(layout, torch.float32)
    alloc = CPUMemoryAllocator(1 << 16)
    obj = alloc.allocate(conn.get_shape(2), torch.float32, MemoryFormat.KV_T2D)
    kw = dict(kvcaches=src, slot_mapping=torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="padding|valid slots"):
        conn.from_gpu(obj, 0, 2, layer_id=0, **kw)  # padding has no KV to store
    with pytest.raises(ValueError, match="valid slots"):
        conn.to_gpu(obj, 0, 2, layer_id=0, kvcaches=src, slot_mapping=torch.tensor([1, 40]))
    with pytest.raises(ValueError, match="layer_id"):
        conn.from_gpu(obj, 0, 2, layer_id=L, **kw)
    with pytest.raises(ValueError, match="slot_mapping"):
        conn.to_gpu(obj, 0, 2, layer_id=0, kvcaches=src, slot_mapping=torch.tensor([1]))
    with pytest.raises(ValueError, match="expected"):
        conn.to_gpu(obj, 0, 3, layer_id=0, kvcaches=src, slot_mapping=torch.arange(3))
    with pytest.raises(ValueError, match="kvcaches has 2 layers"):
        conn.to_gpu(obj, 0, 2, layer_id=0, kvcaches=src[:2], slot_mapping=torch.arange(2))
    with pytest.raises(ValueError, match="need 1 MemoryObjs"):
        load = conn.batched_to_gpu(None, [0], [2], kvcaches=src, slot_mapping=torch.arange(2))
        next(load)
        load.send([])
    with pytest.raises(TypeError, match="one layer at a time"):  # the all-layers engine call
        conn.batched_from_gpu([obj], [0], [2], kvcaches=src, slot_mapping=torch.arange(2))
    with pytest.raises(TypeError, match="one layer at a time"):
        conn.batched_to_gpu([obj], [0], [2], kvcaches=src, slot_mapping=torch.arange(2))
    with pytest.raises(ValueError, match="backend"):
        setup("flash_packed", backend="fast")
    obj.ref_count_down()
