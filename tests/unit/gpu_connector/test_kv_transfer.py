"""gather_kv / scatter_kv (torch reference of the paged KV transfer) against a per-token model.

The expected values come from a deliberately naive per-token reading of each layout as
DESIGN.md §4.6 describes it (not from the vectorised code under test).
"""

from __future__ import annotations

import pytest
import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv, kv_out_shape, scatter_kv

N, H, D, L, BLOCKS = 4, 2, 8, 3, 6
KINDS = ["cpu_packed", "flash_packed", "legacy_5d", "mla"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def make_layout(kind: str) -> KVCacheLayout:
    return KVCacheLayout(kind, N, 1 if kind == "mla" else H, 24 if kind == "mla" else D)


def make_layer(layout: KVCacheLayout, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    shape = {
        "cpu_packed": (BLOCKS, h, n, 2 * d),
        "flash_packed": (BLOCKS, h, n, 2 * d),
        "legacy_5d": (2, BLOCKS, n, h, d),
        "mla": (BLOCKS, n, d),
    }[layout.kind]
    return torch.randn(shape, generator=gen).to(dtype)


def naive_token(layer: torch.Tensor, layout: KVCacheLayout, slot: int) -> torch.Tensor:
    """[2, H*D] (MLA [1, D]) of one slot, read one head at a time."""
    n, d = layout.block_size, layout.head_size
    b, o = divmod(slot, n)
    if layout.kind == "mla":
        return layer[b, o][None]
    k, v = [], []
    for h in range(layout.num_kv_heads):
        if layout.kind == "cpu_packed":
            page = layer[b, h].reshape(2 * n, d)
            k.append(page[o]), v.append(page[n + o])
        elif layout.kind == "flash_packed":
            k.append(layer[b, h, o, :d]), v.append(layer[b, h, o, d:])
        else:
            k.append(layer[0, b, o, h]), v.append(layer[1, b, o, h])
    return torch.stack([torch.cat(k), torch.cat(v)])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_gather_matches_per_token_reading(kind, dtype):
    gen = torch.Generator().manual_seed(1)
    layout = make_layout(kind)
    layers = [make_layer(layout, dtype, gen) for _ in range(L)]
    slots = torch.randperm(BLOCKS * N, generator=gen)[:10]
    out = gather_kv(layers, slots, layout)
    assert out.shape == kv_out_shape(layout, L, 10) and out.dtype == dtype
    for t, slot in enumerate(slots.tolist()):
        for layer_id, layer in enumerate(layers):
            assert torch.equal(bits(out[:, layer_id, t]), bits(naive_token(layer, layout, slot)))


@pytest.mark.parametrize("kind", KINDS)
def test_gather_padding_gives_zeros_and_out_param(kind):
    gen = torch.Generator().manual_seed(2)
    layout = make_layout(kind)
    layers = [make_layer(layout, torch.float32, gen) for _ in range(L)]
    slots = torch.tensor([5, -1, 7], dtype=torch.int32)
    out = torch.full(tuple(kv_out_shape(layout, L, 3)), 9.0)
    assert gather_kv(layers, slots, layout, out=out) is out
    assert torch.count_nonzero(out[:, :, 1]) == 0
    assert torch.equal(out[:, 2, 2], naive_token(layers[2], layout, 7))
    with pytest.raises(ValueError, match=r"expected \(.*, 3, .*\) dtype torch.float32"):
        gather_kv(layers, slots, layout, out=torch.empty(1, 1, 1, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_scatter_writes_exactly_the_valid_slots(kind, dtype):
    gen = torch.Generator().manual_seed(3)
    layout = make_layout(kind)
    layers = [make_layer(layout, dtype, gen) for _ in range(L)]
    before = [t.clone() for t in layers]
    slots = torch.tensor([9, -1, 0, 22, -1, 13])
    kv = torch.randn(tuple(kv_out_shape(layout, L, 6)), generator=gen).to(dtype)
    scatter_kv(layers, slots, layout, kv)
    written = {9: 0, 0: 2, 22: 3, 13: 5}
    for layer_id, layer in enumerate(layers):
        for slot in range(BLOCKS * N):
            got = naive_token(layer, layout, slot)
            want = kv[:, layer_id, written[slot]] if slot in written else naive_token(
                before[layer_id], layout, slot)
            assert torch.equal(bits(got), bits(want)), (layer_id, slot)


def test_scatter_rejects_wrong_kv_shape_and_dtype():
    layout = make_layout("flash_packed")
    layers = [make_layer(layout, torch.float16, torch.Generator().manual_seed(0))] * L
    slots = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"expected \(2, 3, 2, 16\) dtype torch.float16"):
        scatter_kv(layers, slots, layout, torch.zeros(2, 3, 2, 16))
    with pytest.raises(ValueError, match="slots must be a 1-D integer tensor"):
        scatter_kv(layers, slots[None], layout, torch.zeros(2, 3, 2, 16, dtype=torch.float16))


def test_strided_layer_views_of_one_shared_buffer():
    """vLLM 0.32 hands each layer a view into one buffer; views need not be contiguous."""
    layout = make_layout("cpu_packed")
    buf = torch.randn(BLOCKS, L, H, N, 2 * D, generator=torch.Generator().manual_seed(4))
    layers = [buf[:, i] for i in range(L)]
    assert not layers[0].is_contiguous()
    slots = torch.tensor([3, 17, 8])
    kv = gather_kv(layers, slots, layout)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(kv[:, 1, t], naive_token(layers[1], layout, slot))
    buf.zero_()
    scatter_kv(layers, slots, layout, kv)
    assert torch.equal(gather_kv(layers, slots, layout), kv)
    assert torch.count_nonzero(buf) == torch.count_nonzero(kv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    gen = torch.Generator().manual_seed(5)
    layout = make_layout(kind)
    layers = [make_layer(layout, torch.bfloat16, gen) for _ in range(L)]
    slots = torch.tensor([4, -1, 19, 2])
    cpu = gather_kv(layers, slots, layout)
    gpu = gather_kv([t.cuda() for t in layers], slots.cuda(), layout)
    assert torch.equal(bits(gpu.cpu()), bits(cpu))
    dev_layers = [torch.zeros_like(t).cuda() for t in layers]
    scatter_kv(dev_layers, slots.cuda(), layout, cpu)
    assert torch.equal(bits(gather_kv(dev_layers, slots, layout).cpu()), bits(cpu))
