"""Stores never read KV the compute stream has not finished writing (issue 14), on a real GPU.

The "forward pass" writes the KV on the compute stream behind a long kernel (``_sleep``), and
the engine's store is called right after, without any synchronisation — the moment LMCache 0.5.3
was seen storing stale bytes. The engine (VLLMPagedMemGPUConnectorV2 kernels, dma and mapped,
``wait=True`` and ``wait=False``) must store the new bytes; the retrieve likewise must land after
compute that still writes the target pages. Skipped without CUDA and CuPy.
"""

from __future__ import annotations

import pytest
import torch

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.cupy_kernels import cupy_available
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and cupy_available()),
                       reason="needs CUDA and CuPy"),
]

L, H, D, N, C, BLOCKS, T = 4, 2, 64, 16, 256, 160, 1024
DTYPE = torch.bfloat16


def warm_up(engine: LMCacheEngine, kv: list) -> None:
    """One store and retrieve of other tokens first: the connector's first call allocates its
    staging buffers and layer table, which synchronises the device (that would hide a race)."""
    ids = torch.arange(C)
    slots = torch.arange(N, N + C, device="cuda")
    engine.store(ids, kvcaches=kv, slot_mapping=slots)
    engine.retrieve(ids, kvcaches=kv, slot_mapping=slots)
    engine.clear()
    torch.cuda.synchronize()


def engine_for(transfer: str) -> tuple[LMCacheEngine, KVCacheLayout, CPUMemoryAllocator]:
    meta = LMCacheMetadata("race/model", 1, 0, DTYPE, (L, 2, C, H, D))
    layout = KVCacheLayout("flash_packed", N, H, D)
    alloc = CPUMemoryAllocator(64 << 20)
    backend = LocalCPUBackend(alloc, LRUCachePolicy(), max_local_cpu_size=1.0)
    engine = LMCacheEngine(meta, ChunkedTokenDatabase(meta, C),
                           VLLMPagedMemGPUConnectorV2(meta, layout, backend="cupy",
                                                      transfer=transfer),
                           StorageManager([backend]))
    return engine, layout, alloc


@pytest.mark.parametrize("transfer", ["dma", "mapped"])
@pytest.mark.parametrize("wait", [True, False])
def test_store_after_unsynchronised_write_stores_the_new_bytes(transfer, wait):
    engine, layout, alloc = engine_for(transfer)
    gen = torch.Generator(device="cuda").manual_seed(1)
    kv = [torch.zeros(BLOCKS, H, N, 2 * D, device="cuda", dtype=DTYPE) for _ in range(L)]
    perm = torch.randperm(BLOCKS * N - N, generator=torch.Generator().manual_seed(2)) + N
    src, dst = perm[:T].cuda(), perm[T:2 * T].cuda()
    ids = torch.randint(0, 50000, (T,), generator=torch.Generator().manual_seed(3))
    new = [torch.randn(BLOCKS, H, N, 2 * D, device="cuda", dtype=DTYPE, generator=gen)
           for _ in range(L)]
    warm_up(engine, kv)
    # the forward pass: a long kernel, then it writes this step's KV; no sync before the store
    torch.cuda._sleep(200_000_000)
    for layer in range(L):
        kv[layer].copy_(new[layer])
    assert engine.store(ids, kvcaches=kv, slot_mapping=src, wait=wait) == T
    engine.wait_for_stores()
    # retrieve into other pages that the compute stream is still zeroing (late): lands after
    torch.cuda._sleep(200_000_000)
    for layer in range(L):
        kv[layer].view(BLOCKS, H, N, 2 * D)[dst.div(N, rounding_mode="floor").unique()] = 0
    mask = engine.retrieve(ids, kvcaches=kv, slot_mapping=dst)
    assert int(mask.sum()) == T
    torch.cuda.synchronize()
    want = gather_kv(new, src, layout)
    assert torch.equal(gather_kv(kv, dst, layout), want)
    assert engine.stats.value("failed_stores") == 0
    engine.close()
    assert alloc.num_active_allocations == 0


def test_store_wait_false_reaches_the_tier_after_wait_for_stores():
    engine, layout, alloc = engine_for("dma")
    kv = [torch.randn(BLOCKS, H, N, 2 * D, device="cuda", dtype=DTYPE) for _ in range(L)]
    src = (torch.randperm(BLOCKS * N - N, generator=torch.Generator().manual_seed(4)) + N)[:T]
    ids = torch.randint(0, 50000, (T,), generator=torch.Generator().manual_seed(5))
    warm_up(engine, kv)
    torch.cuda._sleep(100_000_000)  # compute still busy when the store is called
    assert engine.store(ids, kvcaches=kv, slot_mapping=src.cuda(), wait=False) == T
    engine.wait_for_stores()
    assert engine.lookup(ids) == T
    engine.close()
    assert alloc.num_active_allocations == 0
