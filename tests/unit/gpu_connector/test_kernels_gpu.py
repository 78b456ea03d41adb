"""The csrc/ CUDA kernels, bit for bit against the torch reference, on a real GPU.

Every layout (cpu_packed, flash_packed, legacy_5d, mla), several dtypes and word widths,
MemoryObjs in pinned host memory (read/written through mapped pointers) and in device memory,
batches of chunks, padding slots, out-of-range slots, interleaved (non-contiguous) layer views,
the two connectors built on the kernels, and the stream ordering they promise. Inputs are fresh
random data, outputs are poisoned first. Skipped when CuPy or CUDA is absent.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from lmcache.gpu_connector.cupy_kernels import cupy_available, launch_transfer
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv
from lmcache.gpu_connector.vllm_layerwise import VLLMPagedMemLayerwiseGPUConnector
from lmcache.gpu_connector.paged_torch import TorchPagedMemGPUConnector
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and cupy_available()),
                       reason="needs CUDA and CuPy"),
]

KINDS = ["cpu_packed", "flash_packed", "legacy_5d", "mla"]
DEV = "cuda"


def seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu()


def as_ref(t: torch.Tensor) -> torch.Tensor:
    """The tensor the torch reference runs on: 1-byte float types as uint8 (same shape and
    bytes; torch's indexing kernels need not support fp8)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def rand(shape, dtype, gen) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype).to(DEV)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(dtype).to(DEV)


def layer_shape(kind, n, h, d, blocks):
    return {"legacy_5d": (2, blocks, n, h, d), "mla": (blocks, n, d)}.get(kind, (blocks, h, n, 2 * d))


def make_layers(kind, layers, n, h, d, blocks, dtype, gen, interleaved=False):
    shape = layer_shape(kind, n, h, d, blocks)
    if not interleaved:
        return [rand(shape, dtype, gen) for _ in range(layers)]
    dim = 1 if kind == "legacy_5d" else 0  # one buffer, layer dim inside the block dim
    big_shape = list(shape)
    big_shape.insert(dim + 1, layers)
    big = rand(tuple(big_shape), dtype, gen)
    return [big.select(dim + 1, i) for i in range(layers)]


def host(shape, dtype, where):
    t = torch.empty(shape, dtype=dtype, pin_memory=(where == "pinned"),
                    device=DEV if where == "device" else "cpu")
    t.view(torch.uint8).fill_(0xA5)  # poison
    return t


CASES = [(k, torch.bfloat16, 8, 128) for k in KINDS] + [
    ("flash_packed", torch.float16, 4, 64), ("legacy_5d", torch.float32, 2, 32),
    ("cpu_packed", torch.float8_e4m3fn, 4, 64), ("flash_packed", torch.float16, 3, 3),
    ("legacy_5d", torch.uint8, 2, 5), ("mla", torch.bfloat16, 1, 576),
]


@pytest.mark.parametrize("kind,dtype,heads,size", CASES)
@pytest.mark.parametrize("where", ["pinned", "device"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_multi_layer_kernel_matches_reference(kind, dtype, heads, size, where, interleaved):
    gen = torch.Generator().manual_seed(seed(kind, dtype, where, interleaved))
    heads = 1 if kind == "mla" else heads
    n, blocks, layers = 16, 40, 5
    layout = KVCacheLayout(kind, n, heads, size)
    kv = make_layers(kind, layers, n, heads, size, blocks, dtype, gen, interleaved)
    nk = 1 if kind == "mla" else 2
    lens = [16, 37, 1, 100]
    total = sum(lens)
    slots = torch.randperm(blocks * n, generator=gen)[:total]
    slots[[3, 60]] = -1
    mapping = torch.cat([torch.full((5,), 12345), slots]).to(DEV)
    starts = [5 + sum(lens[:i]) for i in range(len(lens))]
    objs = [host((nk, layers, t, heads * size), dtype, where) for t in lens]
    handle = launch_transfer(kv, layout, objs, mapping, starts, to_paged=False, single_layer=False)
    handle.wait()
    assert handle.saw_padding
    want = gather_kv([as_ref(t) for t in kv], slots.to(DEV), layout)
    assert torch.equal(bits(torch.cat([o.to(DEV) for o in objs], dim=2)), bits(want))

    new = [host((nk, layers, t, heads * size), dtype, where) for t in lens]
    for o in new:
        o.copy_(rand(o.shape, dtype, gen))
    ref = [as_ref(t.clone()) for t in kv]
    scatter_kv(ref, slots.to(DEV), layout, as_ref(torch.cat([o.to(DEV) for o in new], dim=2)))
    handle = launch_transfer(kv, layout, new, mapping, starts, to_paged=True, single_layer=False)
    handle.wait()
    assert not handle.saw_padding
    for got, exp in zip(kv, ref):
        assert torch.equal(bits(got), bits(exp))


@pytest.mark.parametrize("kind,dtype,heads,size", CASES)
def test_single_layer_kernel_matches_reference(kind, dtype, heads, size):
    gen = torch.Generator().manual_seed(seed(kind, dtype, "single"))
    heads = 1 if kind == "mla" else heads
    n, blocks = 16, 30
    layout = KVCacheLayout(kind, n, heads, size)
    layer = make_layers(kind, 1, n, heads, size, blocks, dtype, gen)[0]
    nk = 1 if kind == "mla" else 2
    lens = [20, 7, 64]
    slots = torch.randperm(blocks * n, generator=gen)[:sum(lens)].to(DEV)
    starts = [0, 20, 27]
    objs = [host((t, nk, heads * size), dtype, "pinned") for t in lens]
    launch_transfer([layer], layout, objs, slots, starts, to_paged=False, single_layer=True).wait()
    want = gather_kv([as_ref(layer)], slots, layout)[:, 0].transpose(0, 1)
    assert torch.equal(bits(torch.cat(objs)), bits(want))
    src = [rand(o.shape, dtype, gen).cpu().pin_memory() for o in objs]
    ref = as_ref(layer.clone())
    scatter_kv([ref], slots, layout, as_ref(torch.cat(src).to(DEV)).transpose(0, 1).unsqueeze(1))
    launch_transfer([layer], layout, src, slots, starts, to_paged=True, single_layer=True).wait()
    assert torch.equal(bits(layer), bits(ref))


def test_out_of_range_slot_raises_and_touches_nothing_outside():
    layout = KVCacheLayout("flash_packed", 16, 2, 64)
    layer = torch.zeros(4, 2, 16, 128, dtype=torch.bfloat16, device=DEV)
    guard = torch.zeros(1 << 16, dtype=torch.bfloat16, device=DEV)  # memory after the cache
    obj = torch.ones(2, 1, 3, 128, dtype=torch.bfloat16).pin_memory()
    slots = torch.tensor([0, 64, 1000], device=DEV)  # 64 slots; 64 and 1000 are outside
    handle = launch_transfer([layer], layout, [obj], slots, [0], to_paged=True, single_layer=False)
    with pytest.raises(ValueError, match="outside the KV cache"):
        handle.wait()
    assert int((layer != 0).sum()) == 2 * 2 * 64  # slot 0 only: 2 heads x (K 64 + V 64)
    assert int(guard.abs().sum()) == 0


def _connectors(kind, dtype, layers, heads, size):
    mla = kind == "mla"
    meta = LMCacheMetadata("m", 1, 0, dtype, (layers, 1 if mla else 2, 256, heads, size), use_mla=mla)
    layout = KVCacheLayout(kind, 16, heads, size)
    return meta, layout


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transfer", ["dma", "mapped"])
def test_paged_connector_kernel_path_equals_torch_path(kind, transfer):
    gen = torch.Generator().manual_seed(5)
    (heads, size), layers = ((1, 64) if kind == "mla" else (4, 32)), 6
    meta, layout = _connectors(kind, torch.bfloat16, layers, heads, size)
    # 1 MiB staging buffers hold one ~0.8 MiB chunk: 3 groups alternate over the two buffers
    fast = VLLMPagedMemGPUConnectorV2(meta, layout, backend="cupy", transfer=transfer,
                                          staging_mib=1)
    slow = TorchPagedMemGPUConnector(meta, layout)
    kv = make_layers(kind, layers, 16, heads, size, 64, torch.bfloat16, gen)
    slots = torch.randperm(64 * 16, generator=gen)[:600].to(DEV)
    alloc = CPUMemoryAllocator(64 << 20)
    assert alloc.pinned
    starts, ends = [0, 256, 512], [256, 512, 600]
    a = [alloc.allocate(fast.get_shape(e - s), torch.bfloat16, fast.fmt) for s, e in zip(starts, ends)]
    b = [alloc.allocate(fast.get_shape(e - s), torch.bfloat16, fast.fmt) for s, e in zip(starts, ends)]
    pageable = torch.empty(fast.get_shape(88), dtype=torch.bfloat16)  # staged path
    fast.batched_from_gpu(a, starts, ends, kvcaches=kv, slot_mapping=slots)
    slow.batched_from_gpu(b, starts, ends, kvcaches=kv, slot_mapping=slots)
    for x, y in zip(a, b):
        assert torch.equal(bits(x.tensor), bits(y.tensor))
    page_obj = MemoryObj(pageable.view(-1).view(torch.uint8), pageable.shape, torch.bfloat16, fast.fmt)
    fast.from_gpu(page_obj, 512, 600, kvcaches=kv, slot_mapping=slots)
    assert torch.equal(bits(page_obj.tensor), bits(b[2].tensor))
    with pytest.raises(ValueError, match="padding"):
        bad = slots.clone()
        bad[3] = -1
        fast.from_gpu(a[0], 0, 256, kvcaches=kv, slot_mapping=bad)
    dst_fast = [torch.zeros_like(t) for t in kv]
    dst_slow = [torch.zeros_like(t) for t in kv]
    new_slots = torch.randperm(64 * 16, generator=gen)[:600].to(DEV)
    new_slots[7] = -1
    fast.batched_to_gpu(b, starts, ends, kvcaches=dst_fast, slot_mapping=new_slots)
    slow.batched_to_gpu(b, starts, ends, kvcaches=dst_slow, slot_mapping=new_slots)
    for x, y in zip(dst_fast, dst_slow):
        assert torch.equal(bits(x), bits(y))
    for o in a + b:
        o.ref_count_down()


@pytest.mark.parametrize("kind", ["flash_packed", "mla"])
def test_layerwise_kernel_path_equals_torch_path_and_orders_streams(kind):
    gen = torch.Generator().manual_seed(9)
    (heads, size), layers = ((1, 64) if kind == "mla" else (8, 128)), 4
    meta, layout = _connectors(kind, torch.bfloat16, layers, heads, size)
    fast = VLLMPagedMemLayerwiseGPUConnector(meta, layout, backend="cupy")
    slow = VLLMPagedMemLayerwiseGPUConnector(meta, layout, backend="torch")
    kv = make_layers(kind, layers, 16, heads, size, 64, torch.bfloat16, gen)
    slots = torch.randperm(64 * 16, generator=gen)[:300].to(DEV)
    starts, ends = [0, 256], [256, 300]
    alloc = CPUMemoryAllocator(64 << 20)
    objs = [[alloc.allocate(fast.get_shape(e - s), torch.bfloat16, MemoryFormat.KV_T2D)
             for s, e in zip(starts, ends)] for _ in range(layers)]
    ref = [[torch.empty(fast.get_shape(e - s), dtype=torch.bfloat16) for s, e in zip(starts, ends)]
           for _ in range(layers)]
    store = fast.batched_from_gpu(objs, starts, ends, kvcaches=kv, slot_mapping=slots)
    for layer in range(layers):
        # the "forward pass" writes this layer late on the compute stream; the store must see it
        torch.cuda._sleep(20_000_000)
        kv[layer].mul_(-1)
        next(store)
    assert next(store, "end") == "end"
    ref_objs = [[MemoryObj(t.view(-1).view(torch.uint8), t.shape, torch.bfloat16, MemoryFormat.KV_T2D)
                 for t in row] for row in ref]
    for _ in slow.batched_from_gpu(ref_objs, starts, ends, kvcaches=kv, slot_mapping=slots):
        pass
    for row, ref_row in zip(objs, ref):
        for o, r in zip(row, ref_row):
            assert torch.equal(bits(o.tensor), bits(r))

    dst = [torch.zeros_like(t) for t in kv]
    load = fast.batched_to_gpu(None, starts, ends, kvcaches=dst, slot_mapping=slots)
    torch.cuda._sleep(20_000_000)  # older compute still writing these pages: the load goes after
    for t in dst:
        t.fill_(7)
    next(load)
    sums = []
    for layer in range(layers):
        load.send(objs[layer]).wait_on()  # compute waits for the layer, the host does not
        sums.append(dst[layer].float().sum())  # "attention" reads the layer on the compute stream
    assert next(load, "end") == "end"
    for layer in range(layers):
        assert torch.equal(bits(gather_kv([dst[layer]], slots, layout)),
                           bits(gather_kv([kv[layer]], slots, layout)))
        assert float(sums[layer]) == float(dst[layer].float().sum())
    for row in objs:
        for o in row:
            o.ref_count_down()
