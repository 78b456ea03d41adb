"""An in-process fleet for the controller unit tests (helpers and fixtures, imported by the tests): a CacheController on free ports and
LMCacheWorkers over real CPU tiers (real ZMQ sockets, real threads)."""

from __future__ import annotations

import time

import pytest
import torch

from lmcache.controller.cache_controller import CacheController
from lmcache.controller.index.memory import MemoryChunkIndex
from lmcache.controller.lmcache_worker import LMCacheWorker
from lmcache.memory import CPUMemoryAllocator, MemoryFormat
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

C = 16  # chunk size
META = LMCacheMetadata("lmcache/ctl-test", 1, 0, torch.float32, (1, 2, C, 1, 4))


def tokens(seed: int, chunks: int) -> list[int]:
    return torch.randint(0, 30000, (chunks * C,), generator=torch.Generator().manual_seed(seed)).tolist()


def eventually(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


class Worker:
    """One instance's worker: CPU tier + StorageManager + LMCacheWorker."""

    def __init__(self, controller: CacheController, instance_id: str, heartbeat: float = 0.1):
        self.db = ChunkedTokenDatabase(META, chunk_size=C)
        self.allocator = CPUMemoryAllocator(1 << 20, pin_memory=False)
        self.cpu = LocalCPUBackend(self.allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024)
        self.manager = StorageManager([self.cpu])
        self.worker = LMCacheWorker(
            META, self.manager, self.db, lmcache_instance_id=instance_id,
            controller_pull_url=f"127.0.0.1:{controller.pull_port}",
            controller_reply_url=f"127.0.0.1:{controller.reply_port}",
            lmcache_worker_ports=[0], lmcache_worker_heartbeat_time=heartbeat,
            lmcache_worker_heartbeat_delay_time=0, batch_interval_secs=0.01,
            request_timeout_secs=0.5)

    def store(self, toks: list[int]) -> int:
        keys = [k for _, _, k in self.db.process_tokens(toks)]
        objs = [self.manager.allocate((2, 1, C, 4), torch.float32, MemoryFormat.KV_2LTD)
                for _ in keys]
        self.manager.batched_put(keys, objs)
        return len(keys)

    def close(self) -> None:
        self.worker.close()
        self.manager.close()
        self.allocator.close()


@pytest.fixture
def controller():
    ctl = CacheController(MemoryChunkIndex(), ChunkedTokenDatabase(None, chunk_size=C),
                          controller_host="127.0.0.1",
                          controller_monitor_ports={"pull": 0, "reply": 0},
                          lmcache_worker_timeout=1.0, command_timeout_secs=2.0)
    yield ctl
    ctl.close()


@pytest.fixture
def make_worker(controller):
    made = []

    def make(instance_id: str, **kw) -> Worker:
        w = Worker(controller, instance_id, **kw)
        made.append(w)
        assert eventually(w.worker.registered.is_set), f"{instance_id} did not register"
        return w

    yield make
    for w in made:
        w.close()
