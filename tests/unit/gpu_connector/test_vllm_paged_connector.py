"""VLLMPagedMemGPUConnectorV2: round trips through real MemoryObjs for every layout and dtype."""

from __future__ import annotations

import pytest
import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata

N, H, D, L, BLOCKS, MLA_D = 4, 2, 8, 3, 12, 24
KINDS = ["cpu_packed", "flash_packed", "legacy_5d", "mla"]
POISON = 77.0


def setup(kind: str, dtype: torch.dtype):
    mla = kind == "mla"
    heads, size = (1, MLA_D) if mla else (H, D)
    meta = LMCacheMetadata("m", 1, 0, dtype, (L, 1 if mla else 2, 8, heads, size), use_mla=mla)
    layout = KVCacheLayout(kind, N, heads, size)
    return meta, layout, VLLMPagedMemGPUConnectorV2(meta, layout)


def layer_shape(layout: KVCacheLayout) -> tuple[int, ...]:
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    return {
        "cpu_packed": (BLOCKS, h, n, 2 * d), "flash_packed": (BLOCKS, h, n, 2 * d),
        "legacy_5d": (2, BLOCKS, n, h, d), "mla": (BLOCKS, n, d),
    }[layout.kind]


def random_caches(layout, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(layer_shape(layout), generator=gen).to(dtype) for _ in range(L)]


def poisoned_caches(layout, dtype):
    return [torch.full(layer_shape(layout), POISON, dtype=dtype) for _ in range(L)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def slot_bits(caches, layout, slots):
    """Per-slot KV of all layers as bytes, via the reference gather (slots >= 0)."""
    return bits(gather_kv(caches, torch.as_tensor(slots), layout))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_restores_touched_slots_only(kind, dtype):
    meta, layout, conn = setup(kind, dtype)
    src = random_caches(layout, dtype, seed=11)
    gen = torch.Generator().manual_seed(12)
    offset, seq_len = 3, 19
    src_slots = torch.randperm(BLOCKS * N, generator=gen)[: seq_len - offset]
    alloc = CPUMemoryAllocator(1 << 20)
    chunks = [(3, 11), (11, 19)]
    objs = [alloc.allocate(conn.get_shape(e - s), dtype, conn.fmt) for s, e in chunks]
    conn.batched_from_gpu(objs, [s for s, _ in chunks], [e for _, e in chunks],
                          kvcaches=src, slot_mapping=src_slots, offset=offset)
    # a different placement with padding: tokens 5 and 16 are not written back
    dst_slots = torch.randperm(BLOCKS * N, generator=gen)[: seq_len - offset].clone()
    dst_slots[[5 - offset, 16 - offset]] = -1
    dst = poisoned_caches(layout, dtype)
    for obj, (s, e) in zip(objs, chunks):
        conn.to_gpu(obj, s, e, kvcaches=dst, slot_mapping=dst_slots.to(torch.int32), offset=offset)
        obj.ref_count_down()
    written = {int(d): int(s) for s, d in zip(src_slots, dst_slots) if d >= 0}
    assert len(written) == seq_len - offset - 2
    dst_list, src_list = list(written), list(written.values())
    assert torch.equal(slot_bits(dst, layout, dst_list), slot_bits(src, layout, src_list))
    untouched = [s for s in range(BLOCKS * N) if s not in written]
    expect = torch.full((1 if kind == "mla" else 2, L, len(untouched), layout.hidden_dim),
                        POISON, dtype=dtype)
    assert torch.equal(gather_kv(dst, torch.tensor(untouched), layout), expect)


def test_from_gpu_content_and_shape():
    meta, layout, conn = setup("cpu_packed", torch.float32)
    assert conn.fmt == MemoryFormat.KV_2LTD and conn.get_shape(5) == torch.Size([2, L, 5, H * D])
    _, mla_layout, mla_conn = setup("mla", torch.float32)
    assert mla_conn.fmt == MemoryFormat.KV_MLA_FMT
    assert mla_conn.get_shape(5) == torch.Size([1, L, 5, MLA_D])
    caches = random_caches(layout, torch.float32, seed=1)
    slots = torch.arange(40, 48)
    alloc = CPUMemoryAllocator(1 << 16)
    obj = alloc.allocate(conn.get_shape(4), torch.float32, conn.fmt)
    conn.from_gpu(obj, 2, 6, kvcaches=caches, slot_mapping=slots)
    # token 2 -> slot 42 = block 10 offset 2; head 1's page rows 2 (K) and 6 (V)
    page = caches[2][10, 1].reshape(2 * N, D)
    assert torch.equal(obj.tensor[0, 2, 0, D:], page[2])
    assert torch.equal(obj.tensor[1, 2, 0, D:], page[N + 2])
    obj.ref_count_down()


def test_errors_name_shapes_and_dtypes():
    meta, layout, conn = setup("flash_packed", torch.bfloat16)
    caches = random_caches(layout, torch.bfloat16, seed=2)
    alloc = CPUMemoryAllocator(1 << 16)
    obj = alloc.allocate(conn.get_shape(4), torch.bfloat16, conn.fmt)
    ok = dict(kvcaches=caches, slot_mapping=torch.arange(8))
    try:
        with pytest.raises(ValueError, match="kvcaches has 2 layers, metadata kv_shape .* has 3"):
            conn.from_gpu(obj, 0, 4, kvcaches=caches[:2], slot_mapping=torch.arange(8))
        bad = [c.float() for c in caches]
        msg = r"kvcaches\[0\].*dtype torch.float32, expected torch.bfloat16"
        with pytest.raises(ValueError, match=msg):
            conn.from_gpu(obj, 0, 4, kvcaches=bad, slot_mapping=torch.arange(8))
        msg = r"shape \(12, 2, 4, 8\).*expected \[num_blocks, 2, 4, 16\]"
        with pytest.raises(ValueError, match=msg):
            conn.to_gpu(obj, 0, 4, kvcaches=[c[..., :8] for c in caches],
                        slot_mapping=torch.arange(8))
        with pytest.raises(TypeError, match="kvcaches must be a non-empty list"):
            conn.from_gpu(obj, 0, 4, slot_mapping=torch.arange(8))
        with pytest.raises(ValueError, match=r"tokens \[0, 5\).*expected \(2, 3, 5, 16\)"):
            conn.from_gpu(obj, 0, 5, **ok)
        msg = r"slots in \[-1, 3\]; valid slots are \[0, 47\].*padding"
        with pytest.raises(ValueError, match=msg):
            conn.from_gpu(obj, 0, 4, kvcaches=caches, slot_mapping=torch.tensor([0, -1, 2, 3]))
        with pytest.raises(ValueError, match=r"slots in \[0, 48\]; valid slots are \[-1, 47\]"):
            conn.to_gpu(obj, 0, 4, kvcaches=caches, slot_mapping=torch.tensor([0, 48, 2, 3]))
        with pytest.raises(ValueError, match=r"need slot_mapping\[2:6\].*has 5 entries"):
            conn.from_gpu(obj, 4, 8, kvcaches=caches, slot_mapping=torch.arange(5), offset=2)
        with pytest.raises(ValueError, match=r"offset must be an int in \[0, start=0\], got 1"):
            conn.from_gpu(obj, 0, 4, offset=1, **ok)
        with pytest.raises(ValueError, match="slot_mapping must be a 1-D integer"):
            conn.from_gpu(obj, 0, 4, kvcaches=caches, slot_mapping=torch.zeros(8))
    finally:
        obj.ref_count_down()


def test_layout_must_match_metadata():
    meta, _, _ = setup("cpu_packed", torch.float16)
    with pytest.raises(ValueError, match="num_kv_heads=4, head_size=8; metadata kv_shape"):
        VLLMPagedMemGPUConnectorV2(meta, KVCacheLayout("cpu_packed", N, 4, D))
    with pytest.raises(ValueError, match="'mla' does not match metadata use_mla=False"):
        VLLMPagedMemGPUConnectorV2(meta, KVCacheLayout("mla", N, 1, D))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_cache_round_trip_through_cpu_memory(kind):
    dtype = torch.bfloat16
    _, layout, conn = setup(kind, dtype)
    src = [t.cuda() for t in random_caches(layout, dtype, seed=3)]
    slots = torch.randperm(BLOCKS * N)[:10].cuda()
    alloc = CPUMemoryAllocator(1 << 20)
    obj = alloc.allocate(conn.get_shape(10), dtype, conn.fmt)
    conn.from_gpu(obj, 0, 10, kvcaches=src, slot_mapping=slots)
    dst = [t.cuda() for t in poisoned_caches(layout, dtype)]
    conn.to_gpu(obj, 0, 10, kvcaches=dst, slot_mapping=slots)
    obj.ref_count_down()
    assert torch.equal(gather_kv(dst, slots, layout), gather_kv(src, slots, layout))
