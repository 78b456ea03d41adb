"""LMCacheManager over a real engine (CPU tier): health with tier states, effective config,
metrics and the internal API server over real HTTP; ordered, idempotent shutdown."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from omegaconf import OmegaConf

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.lmcache_manager import LMCacheManager
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

C, L, H, D, N = 4, 2, 2, 8, 4


class BrokenTier(LocalCPUBackend):
    """A real CPU tier whose lookups fail, as a remote tier whose server is gone."""

    def contains(self, key, pin=False):
        raise ConnectionError("server gone")


def make_engine(extra_tier=False):
    meta = LMCacheMetadata("org/model", 1, 0, torch.bfloat16, (L, 2, C, H, D))
    alloc = CPUMemoryAllocator(1 << 16)
    tiers = [LocalCPUBackend(alloc, LRUCachePolicy(), max_local_cpu_size=1.0)]
    if extra_tier:
        tiers.append(BrokenTier(CPUMemoryAllocator(1 << 12), LRUCachePolicy(), max_local_cpu_size=1.0))
    return LMCacheEngine(meta, ChunkedTokenDatabase(meta, C), VLLMPagedMemGPUConnectorV2(
        meta, KVCacheLayout("cpu_packed", N, H, D)), StorageManager(tiers))


class Closer:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def close(self):
        self.log.append(self.name)


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_health_conf_metrics_over_http_and_ordered_close():
    engine = make_engine()
    engine.lookup([1, 2, 3, 4, 5, 6, 7, 8])
    cfg = OmegaConf.create({"chunk_size": C, "internal_api_server_enabled": True,
                            "internal_api_server_port_start": 0, "size": "${chunk_size}"})
    order = []
    mgr = LMCacheManager("worker", cfg, worker_id=0, engine=engine,
                         lookup_server=Closer(order, "lookup_server"),
                         lookup_client=Closer(order, "lookup_client"),
                         shutdown_graph=lambda: (order.append("graph"), engine.close())).start()
    try:
        assert mgr.url is not None and mgr.port_offset == 1
        status, body = get(f"{mgr.url}/health")
        doc = json.loads(body)
        assert status == 200 and doc["healthy"] is True and doc["role"] == "worker"
        assert doc["tiers"] == [{"name": "LocalCPUBackend", "class": "LocalCPUBackend",
                                 "state": "ok", "chunks": 0, "error": None}]
        status, body = get(f"{mgr.url}/conf")
        assert status == 200 and json.loads(body)["size"] == C  # resolved
        status, body = get(f"{mgr.url}/metrics")
        assert status == 200 and b"lmcache_lookup_requests_total" in body
        assert get(f"{mgr.url}/nope")[0] == 404
    finally:
        mgr.close()
        mgr.close()  # idempotent
    assert order == ["lookup_client", "lookup_server", "graph"]
    assert mgr.url is None and mgr.is_healthy() is False


def test_failing_tier_is_reported_not_raised():
    engine = make_engine(extra_tier=True)
    mgr = LMCacheManager("worker", {"internal_api_server_enabled": False}, engine=engine).start()
    try:
        assert mgr.url is None  # disabled: no server
        doc = mgr.health()
        assert doc["healthy"] is False
        assert [t["state"] for t in doc["tiers"]] == ["ok", "error"]
        assert doc["tiers"][1]["error"] == "ConnectionError: server gone"
    finally:
        mgr.close()
        engine.close()


def test_ports_and_bad_values():
    sched = LMCacheManager("scheduler", {"internal_api_server_port_start": 7100})
    assert sched.port == 7100 and sched.enabled is False and sched.health()["tiers"] == []
    w = LMCacheManager("worker", {"internal_api_server_enabled": True,
                                  "internal_api_server_port_start": 7100,
                                  "internal_api_server_include_index_list": [0, 2]}, worker_id=0)
    assert w.port == 7101 and w.enabled is False  # offset 1 not listed
    with pytest.raises(ValueError, match="internal_api_server_port_start='x'"):
        LMCacheManager("worker", {"internal_api_server_port_start": "x"})
    with pytest.raises(ValueError, match="role='both'"):
        LMCacheManager("both")
