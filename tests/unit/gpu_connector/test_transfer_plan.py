"""TransferPlan address arithmetic, checked on the CPU against the torch reference.

``replay`` executes a plan exactly as csrc/paged_kv_transfer.cuh does (same descriptors, strides
and slot rules, byte for byte over the tensors' memory), so a wrong stride or descriptor shows
up here without a GPU. The kernels themselves are checked in test_kernels_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv
from lmcache.gpu_connector.transfer_plan import device_address, plan_transfer

KINDS = ("cpu_packed", "flash_packed", "legacy_5d", "mla")


def _bytes(tensor: torch.Tensor) -> tuple[int, torch.Tensor]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), torch.empty(0, dtype=torch.uint8).set_(storage)


class _Memory:
    """Byte-addressable view over the storages of some tensors."""

    def __init__(self, tensors):
        self.regions = [_bytes(t) for t in tensors]

    def _find(self, address: int, n: int) -> tuple[torch.Tensor, int]:
        for base, view in self.regions:
            if base <= address and address + n <= base + view.numel():
                return view, address - base
        raise AssertionError(f"address {address:#x} (+{n}) outside every tensor")

    def read(self, address: int, n: int) -> torch.Tensor:
        view, off = self._find(address, n)
        return view[off:off + n].clone()

    def write(self, address: int, data: torch.Tensor) -> None:
        view, off = self._find(address, data.numel())
        view[off:off + data.numel()] = data


def replay(plan, layer_tensors, objs, slot_mapping, *, to_paged: bool) -> bool:
    """Run ``plan`` like the kernel; returns the kernel's error flag (a slot >= num_slots)."""
    mem = _Memory([*layer_tensors, *objs])
    s = plan.strides
    assert s.head_bytes % plan.word_bytes == 0
    flag = False
    for obj_addr, slot0, ntok, obj_l, obj_k, obj_t in plan.descriptors:
        for layer in range(plan.num_layers):
            for k in range(s.num_kv):
                for t in range(ntok):
                    slot = int(slot_mapping[slot0 + t])
                    flag |= slot >= s.num_slots
                    valid = 0 <= slot < s.num_slots
                    for h in range(plan.heads):
                        o = obj_addr + layer * obj_l + k * obj_k + t * obj_t + h * s.head_bytes
                        p = (plan.layer_addresses[layer] + (slot // plan.block_size) * s.block
                             + (slot % plan.block_size) * s.tok + h * s.head + k * s.kv)
                        if to_paged:
                            if valid:
                                mem.write(p, mem.read(o, s.head_bytes))
                        elif valid:
                            mem.write(o, mem.read(p, s.head_bytes))
                        else:
                            mem.write(o, torch.zeros(s.head_bytes, dtype=torch.uint8))
    return flag


def _layers(kind, num_layers, num_blocks, n, h, d, dtype, interleaved):
    """Layer tensors of ``kind``; ``interleaved`` makes them views into one buffer whose block
    dim is outermost (non-contiguous layer views, as an engine with one shared buffer may hand)."""
    if kind == "legacy_5d":
        shape = (2, num_blocks, n, h, d)
    elif kind == "mla":
        shape = (num_blocks, n, d)
    else:
        shape = (num_blocks, h, n, 2 * d)
    if not interleaved:
        return [torch.randn(shape).to(dtype) for _ in range(num_layers)]
    dim = 1 if kind == "legacy_5d" else 0
    big_shape = list(shape)
    big_shape.insert(dim + 1, num_layers)
    big = torch.randn(big_shape).to(dtype)
    return [big.select(dim + 1, i) for i in range(num_layers)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
@pytest.mark.parametrize("interleaved", [False, True])
def test_multi_layer_plan_matches_reference(kind, dtype, interleaved):
    torch.manual_seed(len(kind) * 7 + interleaved)
    n, h, d, blocks, layers = 4, (1 if kind == "mla" else 2), 8, 6, 3
    layout = KVCacheLayout(kind, n, h, d)
    kv = _layers(kind, layers, blocks, n, h, d, dtype, interleaved)
    slots = torch.randperm(blocks * n)[:13]
    slots[5] = -1
    mapping = torch.cat([torch.full((3,), 7), slots])  # offset 3 inside the mapping
    want = gather_kv(kv, slots, layout)
    objs = [torch.full((want.shape[0], layers, 6, want.shape[3]), 7).to(dtype),
            torch.full((want.shape[0], layers, 7, want.shape[3]), 7).to(dtype)]
    plan = plan_transfer(kv, layout, objs, mapping, [3, 9], single_layer=False,
                         address_of=lambda t: t.data_ptr())
    assert not replay(plan, kv, objs, mapping, to_paged=False)
    assert torch.equal(torch.cat(objs, dim=2).view(torch.uint8), want.view(torch.uint8))

    new = [torch.randn(o.shape).to(dtype) for o in objs]
    ref = [t.clone() for t in kv]
    scatter_kv(ref, slots, layout, torch.cat(new, dim=2))
    plan = plan_transfer(kv, layout, new, mapping, [3, 9], single_layer=False,
                         address_of=lambda t: t.data_ptr())
    assert not replay(plan, kv, new, mapping, to_paged=True)
    for got, exp in zip(kv, ref):
        assert torch.equal(got.view(torch.uint8), exp.view(torch.uint8))


@pytest.mark.parametrize("kind", KINDS)
def test_single_layer_plan_matches_reference(kind):
    torch.manual_seed(7)
    n, h, d, blocks = 4, (1 if kind == "mla" else 3), 4, 5
    layout = KVCacheLayout(kind, n, h, d)
    layer = _layers(kind, 1, blocks, n, h, d, torch.float16, False)[0]
    slots = torch.randperm(blocks * n)[:9]
    want = gather_kv([layer], slots, layout)[:, 0].transpose(0, 1)  # [T, kv, HD]
    obj = torch.empty(want.shape, dtype=torch.float16)
    plan = plan_transfer([layer], layout, [obj], slots, [0], single_layer=True,
                         address_of=lambda t: t.data_ptr())
    assert not replay(plan, [layer], [obj], slots, to_paged=False)
    assert torch.equal(obj, want)

    src = torch.randn(want.shape).half()
    ref = layer.clone()
    scatter_kv([ref], slots, layout, src.transpose(0, 1).unsqueeze(1).contiguous())
    plan = plan_transfer([layer], layout, [src], slots, [0], single_layer=True,
                         address_of=lambda t: t.data_ptr())
    assert not replay(plan, [layer], [src], slots, to_paged=True)
    assert torch.equal(layer, ref)


def test_out_of_range_slot_sets_flag_and_is_skipped():
    layout = KVCacheLayout("flash_packed", 4, 1, 4)
    layer = torch.randn(2, 1, 4, 8)
    before = layer.clone()
    obj = torch.randn(1, 2, 4)  # [T=1, kv, HD]
    plan = plan_transfer([layer], layout, [obj], torch.tensor([8]), [0], single_layer=True,
                         address_of=lambda t: t.data_ptr())
    assert replay(plan, [layer], [obj], torch.tensor([8]), to_paged=True)
    assert torch.equal(layer, before)


def test_word_width_and_bad_arguments():
    layout = KVCacheLayout("flash_packed", 16, 8, 128)
    layer = torch.empty(4, 8, 16, 256, dtype=torch.bfloat16)
    obj = torch.empty(2, 1, 16, 1024, dtype=torch.bfloat16)
    plan = plan_transfer([layer], layout, [obj], torch.arange(16), [0], single_layer=False,
                         address_of=lambda t: t.data_ptr())
    assert plan.word_bytes == 16 and plan.words_per_head == 16 and plan.words_per_row == 128
    assert plan.max_rows == 2 * 16
    odd = KVCacheLayout("flash_packed", 4, 1, 3)  # 3 halves = 6 bytes a head -> 2-byte words
    plan = plan_transfer([torch.empty(2, 1, 4, 6).half()], odd,
                         [torch.empty(2, 1, 4, 3).half()], torch.arange(4), [0],
                         single_layer=False, address_of=lambda t: t.data_ptr())
    assert plan.word_bytes == 2
    with pytest.raises(ValueError, match="slot_mapping"):
        plan_transfer([layer], layout, [obj], torch.arange(10), [0], single_layer=False,
                      address_of=lambda t: t.data_ptr())
    with pytest.raises(ValueError, match="dtype"):
        plan_transfer([layer], layout, [obj.float()], torch.arange(16), [0],
                      single_layer=False, address_of=lambda t: t.data_ptr())
    with pytest.raises(ValueError, match="expected"):
        plan_transfer([layer], layout, [obj[:, :, :, :512]], torch.arange(16), [0],
                      single_layer=False, address_of=lambda t: t.data_ptr())
    with pytest.raises(ValueError, match="pageable"):
        device_address(obj, torch.device("cuda", 0))
