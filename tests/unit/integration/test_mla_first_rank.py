"""MLA as LMCache stores it (save_only_first_rank): a TP=2 instance writes each chunk once to the
shared (remote) store under LMCache's keys (world_size 1, worker_id 0), and a TP=1 instance of the
same model reuses it bit for bit. Real engines, tensors, CPU tiers and an fs:// remote store."""

import threading

import torch

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.integration.vllm.specs import LMCacheConnectorMetadata, ReqMeta, SaveSpec
from lmcache.integration.vllm.worker import ConnectorWorker
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata
from lmcache.serde.naive import NaiveSerde
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.remote import RemoteBackend
from lmcache.storage.connectors.fs import FSConnector
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

C, L, N, BLOCKS, WIDTH = 4, 2, 4, 16, 16  # chunk, layers, block size, blocks, kv_lora+rope width
DTYPE = torch.bfloat16
TOKENS = torch.arange(1000, 1016)  # 4 chunks
SLOTS = torch.arange(N, N + 16)


class CountingFS(FSConnector):
    """The real fs:// connector, counting the values it writes."""

    puts: list[str] = []
    lock = threading.Lock()

    def _put(self, key, metadata, payload):
        with self.lock:
            CountingFS.puts.append(key)
        return super()._put(key, metadata, payload)


class Instance:
    def __init__(self, world_size, worker_id, remote_dir):
        self.meta = LMCacheMetadata("deepseek/tiny", world_size, worker_id, DTYPE, (L, 1, C, 1, WIDTH),
                                    use_mla=True)
        self.allocator = CPUMemoryAllocator(64 * L * C * WIDTH * 2)
        cpu = LocalCPUBackend(self.allocator, LRUCachePolicy(), max_local_cpu_size=1.0)
        self.remote = RemoteBackend(cpu, NaiveSerde(), CountingFS(f"fs://{remote_dir}"))
        self.engine = LMCacheEngine(self.meta, ChunkedTokenDatabase(self.meta, C),
                                    VLLMPagedMemGPUConnectorV2(self.meta, KVCacheLayout("mla", N, 1, WIDTH)),
                                    StorageManager([cpu, self.remote]))
        self.worker = ConnectorWorker(self.engine, [], N)

    def save(self, cache):
        self.worker.kv_caches = cache
        meta = LMCacheConnectorMetadata(requests=[ReqMeta(
            "r", TOKENS, SLOTS, save_spec=SaveSpec(skip_leading_tokens=0, can_save=True), save_end=16)])
        self.worker.save(meta)
        self.remote.flush(10)

    def close(self):
        self.engine.close()
        assert self.allocator.num_active_allocations == 0


def test_tp2_writes_each_chunk_once_and_tp1_reuses_it(tmp_path):
    CountingFS.puts = []
    gen = torch.Generator().manual_seed(0)
    cache = [torch.randn(BLOCKS, N, WIDTH, generator=gen).to(DTYPE) for _ in range(L)]  # same on both ranks
    rank0, rank1 = Instance(2, 0, tmp_path / "remote"), Instance(2, 1, tmp_path / "remote")
    try:
        assert rank1.worker.passive and not rank0.worker.passive
        assert rank1.worker.store_locations == ["LocalCPUBackend"]
        rank1.save(cache)
        rank0.save(cache)
        keys = [k.to_string() for _, _, k in rank0.engine.token_database.process_tokens(TOKENS)]
        assert all(k.startswith("deepseek/tiny@1@0@") and k.endswith("@bfloat16") for k in keys)
        assert sorted(CountingFS.puts) == sorted(keys)  # each chunk written once, by rank 0
        assert rank0.engine.lookup(TOKENS) == rank1.engine.lookup(TOKENS) == 16  # rank 1: its CPU copy
        assert len(rank1.engine.storage_manager.backends[0]) == 4
    finally:
        rank0.close()
        rank1.close()

    tp1 = Instance(1, 0, tmp_path / "remote")
    try:
        assert not tp1.worker.passive
        assert tp1.engine.lookup(TOKENS) == 16
        dst = [torch.zeros(BLOCKS, N, WIDTH, dtype=DTYPE) for _ in range(L)]
        ret = tp1.engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=SLOTS)
        assert ret.all()
        layout = KVCacheLayout("mla", N, 1, WIDTH)
        assert torch.equal(gather_kv(dst, SLOTS, layout), gather_kv(cache, SLOTS, layout))
        assert len(CountingFS.puts) == 4  # reading wrote nothing
    finally:
        tp1.close()
