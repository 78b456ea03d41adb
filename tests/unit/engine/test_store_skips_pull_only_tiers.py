"""A store checks which chunks are already held only on the tiers that keep puts: a tier that
only reads from elsewhere (``p2p``, ``keeps_puts = False``) is not asked. Before, the p2p tier
was asked on every store: a chunk a peer held was never stored locally, and a controller that
was down added its lookup timeout (0.5 s) to every store (measured: store 522 ms per request
with ``deployment=p2p`` and no controller)."""

from __future__ import annotations

from typing import Optional

import torch

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.base import StorageBackendInterface
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.p2p import P2PBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

C, L, H, D, N, BLOCKS = 4, 2, 2, 8, 4, 16
DTYPE = torch.bfloat16


class PeersHoldEverything(StorageBackendInterface):
    """A pull-only tier (as p2p) whose peers claim every chunk; it counts the questions."""

    name = "PeersHoldEverything"
    keeps_puts = False

    def __init__(self) -> None:
        self.asked = 0

    def contains(self, key, pin: bool = False) -> bool:
        self.asked += 1
        return True

    def put(self, key, obj) -> None:
        pass

    def get_blocking(self, key) -> Optional[object]:
        return None

    def unpin(self, key) -> bool:
        return False

    def remove(self, key) -> bool:
        return False

    def clear(self) -> int:
        return 0

    def close(self) -> None:
        pass


def test_store_keeps_locally_what_only_peers_hold():
    assert P2PBackend.keeps_puts is False and LocalCPUBackend.keeps_puts is True
    meta = LMCacheMetadata("org/model", 1, 0, DTYPE, (L, 2, C, H, D))
    allocator = CPUMemoryAllocator(1 << 20, pin_memory=False)
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
    peers = PeersHoldEverything()
    sm = StorageManager([cpu, peers])
    engine = LMCacheEngine(meta, ChunkedTokenDatabase(meta, C),
                           VLLMPagedMemGPUConnectorV2(meta, KVCacheLayout("cpu_packed", N, H, D)),
                           sm)
    try:
        gen = torch.Generator().manual_seed(0)
        kv = [torch.randn((BLOCKS, H, N, 2 * D), generator=gen).to(DTYPE) for _ in range(L)]
        tokens = torch.arange(3 * C)
        stored = engine.store(tokens, kvcaches=kv, slot_mapping=torch.arange(3 * C))
        assert stored == 3 * C  # every chunk stored in the CPU tier, none skipped for the peers
        assert peers.asked == 0
        keys = [k for _, _, k in engine.token_database.process_tokens(tokens)]
        assert [cpu.contains(k) for k in keys] == [True, True, True]
        # a lookup still asks the pull-only tier for what the CPU tier lacks
        more = torch.arange(4 * C)
        assert engine.lookup(more) == 4 * C and peers.asked == 1
    finally:
        engine.close()
        allocator.close()
