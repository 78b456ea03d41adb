"""The row-wise page_map path of gather_kv / scatter_kv (vLLM CPU pages: K dim-major, V
token-major) moves exactly the elements the element-by-element path moves (issue 14)."""

from __future__ import annotations

import pytest
import torch

from lmcache.gpu_connector import kv_transfer
from lmcache.gpu_connector.kv_layout import KVCacheLayout

H, D, N, B, L = 2, 8, 4, 12, 3


def page_map(k: str, v: str) -> torch.Tensor:
    o, d = torch.arange(N)[:, None], torch.arange(D)[None, :]
    halves = []
    for kv, how in enumerate((k, v)):
        base = kv * N * D
        if how == "rows":
            halves.append(base + o * D + d)
        elif how == "cols":
            halves.append(base + d * N + o)
        else:  # some other permutation: element path
            perm = torch.randperm(N * D, generator=torch.Generator().manual_seed(kv)) + base
            halves.append(perm.view(N, D))
    return torch.stack(halves).to(torch.int64)


def element_gather(layers, slots, layout):
    idx = kv_transfer._page_map_index(slots.clamp(min=0), layout)
    out = torch.stack([torch.stack([t.view(-1)[idx[kv].reshape(-1)].view(-1, H * D)
                                    for t in layers]) for kv in range(2)])
    out[:, :, slots < 0] = 0
    return out


SLOT_CASES = {
    "whole blocks in order": torch.arange(4 * N, 8 * N),
    "whole blocks shuffled": (torch.tensor([9, 2, 5])[:, None] * N + torch.arange(N)).flatten(),
    "ends mid-block": torch.arange(2 * N, 5 * N + 1),
    "scattered": torch.randperm(B * N, generator=torch.Generator().manual_seed(3))[:17],
    "padding": torch.tensor([-1, -1] + list(range(3 * N, 4 * N)) + [-1]),
}


@pytest.mark.parametrize("k, v", [("cols", "rows"), ("rows", "rows"), ("rows", "cols"),
                                  ("cols", "cols"), ("other", "rows")])
@pytest.mark.parametrize("case", list(SLOT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_path_equals_element_path(k, v, case, dtype):
    layout = KVCacheLayout("cpu_packed", N, H, D, page_map=page_map(k, v))
    gen = torch.Generator().manual_seed(7)
    layers = [torch.randn(B, H, N, 2 * D, generator=gen).to(dtype) for _ in range(L)]
    slots = SLOT_CASES[case]
    got = kv_transfer.gather_kv(layers, slots, layout)
    assert torch.equal(got, element_gather(layers, slots, layout))
    # scatter: new values land where the element path puts them, nothing else changes
    new = torch.randn(got.shape, generator=gen).to(dtype)
    mine = [t.clone() for t in layers]
    kv_transfer.scatter_kv(mine, slots, layout, new)
    ref = [t.clone() for t in layers]
    keep = slots >= 0
    idx = kv_transfer._page_map_index(slots[keep], layout)
    for layer, t in enumerate(ref):
        for kv in range(2):
            t.view(-1)[idx[kv].reshape(-1)] = new[kv, layer][keep].reshape(-1)
    for a, b in zip(mine, ref):
        assert torch.equal(a, b)


def test_scratch_made_in_inference_mode_is_writable_outside():
    with torch.inference_mode():
        kv_transfer.scratch_buffer(7, (3,), torch.float32, torch.device("cpu"))
    buf = kv_transfer.scratch_buffer(7, (3,), torch.float32, torch.device("cpu"))
    buf.copy_(torch.tensor([1.0, 2.0, 3.0]))  # no "inference tensor" error
    assert buf.tolist() == [1.0, 2.0, 3.0]
