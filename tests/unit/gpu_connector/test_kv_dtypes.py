"""Issue 7.4: every KV cache dtype vLLM 0.32 offers moves bit-exactly through every connector.

``--kv-cache-dtype`` choices map to torch dtypes through vLLM's own table; the KV data is random
bytes (every bit pattern, NaN payloads and negative zeros included), compared byte for byte.
Paths: the torch reference (gather_kv / scatter_kv), the paged connector (torch path, every
layout), the layerwise connector, and on a GPU the CuPy kernels against the torch path.
"""

from __future__ import annotations

import pytest
import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv
from lmcache.gpu_connector.paged_torch import TorchPagedMemGPUConnector
from lmcache.gpu_connector.vllm_layerwise import VLLMPagedMemLayerwiseGPUConnector
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata

N, H, D, L, BLOCKS, MLA_D = 4, 2, 8, 3, 12, 24
KINDS = ["cpu_packed", "flash_packed", "legacy_5d", "mla"]
# vLLM's choices map here (test_vllm_kv_cache_dtypes.py checks it against vLLM's own table):
# "auto" is the model dtype (bf16, fp16 or fp32); fp8 / fp8_e4m3 / fp8_e5m2 and the packed
# quantized caches are uint8; int8 is int8; fp8_inc is float8_e4m3fn. float8_e5m2 also tested.
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.int8,
          torch.float8_e4m3fn, torch.float8_e5m2]


def layer_shape(layout: KVCacheLayout) -> tuple[int, ...]:
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    return {"legacy_5d": (2, BLOCKS, n, h, d), "mla": (BLOCKS, n, d)}.get(
        layout.kind, (BLOCKS, h, n, 2 * d))


def random_bytes(shape, dtype, seed) -> torch.Tensor:
    """Every bit pattern can occur: a float NaN's payload must survive too."""
    n = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(seed))
    return raw.view(dtype).view(shape)


def make(kind: str, dtype: torch.dtype):
    mla = kind == "mla"
    heads, size = (1, MLA_D) if mla else (H, D)
    meta = LMCacheMetadata("m", 1, 0, dtype, (L, 1 if mla else 2, 8, heads, size), use_mla=mla)
    return meta, KVCacheLayout(kind, N, heads, size)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def caches(layout, dtype, seed):
    return [random_bytes(layer_shape(layout), dtype, seed + i) for i in range(L)]


@pytest.mark.parametrize("kind", KINDS)
def test_reference_gather_scatter_with_padding(kind):
    for dtype in DTYPES:
        check_reference(kind, dtype)


def check_reference(kind, dtype):
    _, layout = make(kind, dtype)
    src = caches(layout, dtype, 1)
    slots = torch.tensor([5, -1, 17, 2, 40])
    kv = gather_kv(src, slots, layout)
    assert kv.dtype == dtype
    assert torch.count_nonzero(bits(kv[:, :, 1])) == 0  # padding reads as zero bytes
    dst = caches(layout, dtype, 50)
    before = [bits(t).clone() for t in dst]
    scatter_kv(dst, slots, layout, kv)
    keep = slots[slots >= 0]
    assert torch.equal(bits(gather_kv(dst, keep, layout)), bits(gather_kv(src, keep, layout)))
    others = torch.tensor([s for s in range(BLOCKS * N) if s not in keep.tolist()])
    before_dst = [b.view(dtype).view(t.shape) for b, t in zip(before, dst)]
    assert torch.equal(bits(gather_kv(dst, others, layout)),
                       bits(gather_kv(before_dst, others, layout)))


@pytest.mark.parametrize("kind", KINDS)
def test_paged_connector_round_trip(kind):
    for dtype in DTYPES:
        for cls in (TorchPagedMemGPUConnector, VLLMPagedMemGPUConnectorV2):
            check_paged(kind, dtype, cls)


def check_paged(kind, dtype, cls):
    meta, layout = make(kind, dtype)
    conn = cls(meta, layout)
    src = caches(layout, dtype, 7)
    gen = torch.Generator().manual_seed(8)
    src_slots = torch.randperm(BLOCKS * N, generator=gen)[:13]
    alloc = CPUMemoryAllocator(1 << 20)
    chunks = [(0, 8), (8, 13)]
    objs = [alloc.allocate(conn.get_shape(e - s), dtype, conn.fmt) for s, e in chunks]
    conn.batched_from_gpu(objs, [s for s, _ in chunks], [e for _, e in chunks],
                          kvcaches=src, slot_mapping=src_slots)
    dst_slots = torch.randperm(BLOCKS * N, generator=gen)[:13]
    dst = caches(layout, dtype, 99)
    conn.batched_to_gpu(objs, [s for s, _ in chunks], [e for _, e in chunks],
                        kvcaches=dst, slot_mapping=dst_slots)
    assert torch.equal(bits(gather_kv(dst, dst_slots, layout)),
                       bits(gather_kv(src, src_slots, layout)))
    for obj in objs:
        obj.ref_count_down()
    alloc.close()


@pytest.mark.parametrize("kind", KINDS)
def test_layerwise_connector_round_trip(kind):
    for dtype in DTYPES:
        check_layerwise(kind, dtype)


def check_layerwise(kind, dtype):
    meta, layout = make(kind, dtype)
    conn = VLLMPagedMemLayerwiseGPUConnector(meta, layout, backend="torch")
    src = caches(layout, dtype, 3)
    gen = torch.Generator().manual_seed(4)
    src_slots = torch.randperm(BLOCKS * N, generator=gen)[:10]
    alloc = CPUMemoryAllocator(1 << 20)
    starts, ends = [0, 6], [6, 10]
    objs = [[alloc.allocate(conn.get_shape(e - s), dtype, MemoryFormat.KV_T2D)
             for s, e in zip(starts, ends)] for _ in range(L)]
    store = conn.batched_from_gpu(objs, starts, ends, kvcaches=src, slot_mapping=src_slots)
    assert [next(store).layer_id for _ in range(L)] == list(range(L))
    assert next(store, "end") == "end"
    dst = caches(layout, dtype, 77)
    dst_slots = torch.randperm(BLOCKS * N, generator=gen)[:10]
    load = conn.batched_to_gpu(None, starts, ends, kvcaches=dst, slot_mapping=dst_slots)
    assert next(load) is None
    for layer in range(L):
        load.send(objs[layer]).wait_on()
    assert next(load, "end") == "end"
    assert torch.equal(bits(gather_kv(dst, dst_slots, layout)),
                       bits(gather_kv(src, src_slots, layout)))
    for row in objs:
        for obj in row:
            obj.ref_count_down()
    alloc.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (and CuPy)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cupy_kernel_path_round_trip_every_dtype(kind, dtype):  # GPU runs: one test each
    """On a GPU: the CuPy kernels store and load every dtype bit-exactly (same bytes as the
    torch reference on the same paged cache)."""
    from lmcache.gpu_connector.cupy_kernels import cupy_available

    if not cupy_available():
        pytest.skip("needs CuPy")
    meta, layout = make(kind, dtype)
    conn = VLLMPagedMemGPUConnectorV2(meta, layout, backend="cupy")
    src = [t.cuda() for t in caches(layout, dtype, 5)]
    gen = torch.Generator().manual_seed(6)
    src_slots = torch.randperm(BLOCKS * N, generator=gen)[:13].cuda()
    alloc = CPUMemoryAllocator(1 << 20, pin_memory=True)
    chunks = [(0, 8), (8, 13)]
    objs = [alloc.allocate(conn.get_shape(e - s), dtype, conn.fmt) for s, e in chunks]
    conn.batched_from_gpu(objs, [0, 8], [8, 13], kvcaches=src, slot_mapping=src_slots)
    conn.synchronize()
    want = bits(gather_kv([t.cpu() for t in src], src_slots.cpu(), layout))
    got = bits(torch.cat([o.tensor for o in objs], dim=2))
    assert torch.equal(got, want)
    dst = [t.cuda() for t in caches(layout, dtype, 55)]
    dst_slots = torch.randperm(BLOCKS * N, generator=gen)[:13].cuda()
    conn.batched_to_gpu(objs, [0, 8], [8, 13], kvcaches=dst, slot_mapping=dst_slots)
    conn.synchronize()
    assert torch.equal(bits(gather_kv([t.cpu() for t in dst], dst_slots.cpu(), layout)), want)
    for obj in objs:
        obj.ref_count_down()
    alloc.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (and CuPy)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["cpu_packed", "flash_packed", "mla"])
def test_cupy_layerwise_round_trip_every_dtype(kind, dtype):
    """On a GPU: the layerwise connector's kernels store and load every dtype bit-exactly."""
    from lmcache.gpu_connector.cupy_kernels import cupy_available

    if not cupy_available():
        pytest.skip("needs CuPy")
    meta, layout = make(kind, dtype)
    conn = VLLMPagedMemLayerwiseGPUConnector(meta, layout, backend="cupy")
    src = [t.cuda() for t in caches(layout, dtype, 21)]
    gen = torch.Generator().manual_seed(22)
    src_slots = torch.randperm(BLOCKS * N, generator=gen)[:10].cuda()
    alloc = CPUMemoryAllocator(1 << 20, pin_memory=True)
    starts, ends = [0, 6], [6, 10]
    objs = [[alloc.allocate(conn.get_shape(e - s), dtype, MemoryFormat.KV_T2D)
             for s, e in zip(starts, ends)] for _ in range(L)]
    store = conn.batched_from_gpu(objs, starts, ends, kvcaches=src, slot_mapping=src_slots)
    for _ in range(L):
        next(store)
    assert next(store, "end") == "end"
    dst = [t.cuda() for t in caches(layout, dtype, 23)]
    dst_slots = torch.randperm(BLOCKS * N, generator=gen)[:10].cuda()
    load = conn.batched_to_gpu(None, starts, ends, kvcaches=dst, slot_mapping=dst_slots)
    assert next(load) is None
    for layer in range(L):
        load.send(objs[layer]).wait_on()
    assert next(load, "end") == "end"
    torch.cuda.synchronize()
    want = bits(gather_kv([t.cpu() for t in src], src_slots.cpu(), layout))
    assert torch.equal(bits(gather_kv([t.cpu() for t in dst], dst_slots.cpu(), layout)), want)
    for row in objs:
        for obj in row:
            obj.ref_count_down()
    alloc.close()
