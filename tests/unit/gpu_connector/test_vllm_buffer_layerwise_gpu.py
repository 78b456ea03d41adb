"""VLLMBufferLayerwiseGPUConnector.write_layer on CUDA (marker ``gpu``): the CuPy kernel write
(one launch on the current stream, no host sync) equals kv_transfer's torch path bit for bit,
for both paged layouts, a token mask, an offset and padding slots; a slot outside the cache is
skipped by the kernel and reported by wait_writes."""

from __future__ import annotations

import pytest
import torch

from lmcache.gpu_connector.cupy_kernels import cupy_available
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_buffer_layerwise import VLLMBufferLayerwiseGPUConnector
from lmcache.metadata import LMCacheMetadata

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() and cupy_available()),
                                 reason="needs CUDA and CuPy")]

L, H, D, BS, BLOCKS = 2, 4, 64, 16, 40


@pytest.mark.parametrize("kind", ["flash_packed", "cpu_packed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_write_equals_torch_write(kind, dtype):
    meta = LMCacheMetadata("org/m", 1, 0, dtype, (L, 2, 16, H, D))
    layout = KVCacheLayout(kind, BS, H, D)
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = 300
    base = torch.randn(BLOCKS, H, BS, 2 * D, generator=gen, device="cuda").to(dtype)
    caches = [base.clone(), base.clone()]
    perm = torch.randperm(BLOCKS, device="cuda", generator=gen)
    slots = (perm[:, None] * BS + torch.arange(BS, device="cuda")).flatten()[:n].clone()
    slots[[7, 100]] = -1                                # padding: never written
    kv = torch.randn(2, n, H, D, generator=gen, device="cuda").to(dtype)
    mask = torch.arange(n, device="cuda") % 5 != 0
    conn = VLLMBufferLayerwiseGPUConnector(meta, layout, rope_parameters={}, device="cuda")
    for c, kernel in zip(caches, (True, False)):
        conn.write_kernel = kernel
        conn.write_layer(kv, c, mask, slot_mapping=slots[10:], offset=10)
        conn.wait_writes()
    assert torch.equal(caches[0], caches[1])
    got = gather_kv([caches[0]], slots[10:], layout)[:, 0]
    written = mask[10:] & (slots[10:] >= 0)
    assert torch.equal(got[:, written], kv.reshape(2, n, H * D)[:, 10:][:, written])


def test_kernel_write_reports_slots_outside_the_cache():
    meta = LMCacheMetadata("org/m", 1, 0, torch.bfloat16, (L, 2, 16, H, D))
    layout = KVCacheLayout("flash_packed", BS, H, D)
    conn = VLLMBufferLayerwiseGPUConnector(meta, layout, rope_parameters={}, device="cuda")
    cache = torch.zeros(BLOCKS, H, BS, 2 * D, dtype=torch.bfloat16, device="cuda")
    kv = torch.ones(2, 2, H, D, dtype=torch.bfloat16, device="cuda")
    conn.write_layer(kv, cache, slot_mapping=torch.tensor([3, BLOCKS * BS], device="cuda"))
    with pytest.raises(ValueError, match="outside the KV cache"):
        conn.wait_writes()
    conn.wait_writes()                                  # reported once
    assert gather_kv([cache], torch.tensor([3], device="cuda"), layout).eq(1).all()
