"""The tier deployments, composed and wired by the container, run the engine with real paged
KV caches (CPU): after the CPU tier is cleared (or in a fresh container), hits come from the
disk, from Valkey, from a Valkey Cluster, from lm:// and fs://, bit for bit."""

from __future__ import annotations

import pytest
import torch

from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.metadata import LMCacheMetadata
from storage_servers import LMServerProcess, ValkeyClusterProcesses

C, L, H, D, N, BLOCKS = 16, 2, 2, 8, 4, 32   # chunk, layers, heads, head size, block, blocks
DTYPE = torch.bfloat16
META = LMCacheMetadata("org/model", 1, 0, DTYPE, (L, 2, C, H, D))
LAYOUT = KVCacheLayout("cpu_packed", N, H, D)
TOKENS = torch.randint(0, 50000, (4 * C,), generator=torch.Generator().manual_seed(0))
SLOTS = torch.arange(N, N + 4 * C)          # skip block 0 (vLLM's null block)


def cache(seed=None):
    shape = (BLOCKS, H, N, 2 * D)
    if seed is None:
        return [torch.full(shape, -3.0, dtype=DTYPE) for _ in range(L)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(DTYPE) for _ in range(L)]


def worker(overrides):
    cfg = compose_config([f"chunk_size={C}", "max_local_cpu_size=0.01", *overrides])
    container = build_worker_container(cfg, META, LAYOUT)
    return container, container.engine(), container.backends()


def flush(tiers):
    for tier in tiers:
        if hasattr(tier, "flush"):
            assert tier.flush(timeout=60)


def retrieve_equal(engine, src) -> bool:
    dst = cache()
    ret = engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=SLOTS)
    same = torch.equal(gather_kv(dst, SLOTS, LAYOUT).view(torch.int16),
                       gather_kv(src, SLOTS, LAYOUT).view(torch.int16))
    return bool(ret.all()) and same


def store_clear_cpu_retrieve(overrides, slower_tiers: list[str]):
    """Store, then for each slower tier: clear the tiers above it and retrieve from it."""
    container, engine, tiers = worker(overrides)
    try:
        src = cache(1)
        assert engine.store(TOKENS, kvcaches=src, slot_mapping=SLOTS) == 4 * C
        flush(tiers)
        by_name = {t.name: t for t in tiers}
        for depth, name in enumerate(slower_tiers, start=1):
            for upper in tiers[:depth]:
                upper.clear()
            before = by_name[name].stats["hits"]
            assert engine.lookup(TOKENS) == 4 * C
            assert retrieve_equal(engine, src), f"retrieve from {name} differs"
            assert by_name[name].stats["hits"] - before == 4, f"hits not served by {name}"
            assert len(tiers[0]) == 4  # written back into the CPU tier
    finally:
        shutdown(container)


def test_cpu_disk_deployment_and_restart(tmp_path):
    overrides = ["deployment=cpu_disk", f"local_disk={tmp_path}/disk"]
    store_clear_cpu_retrieve(overrides, ["LocalDiskBackend"])
    container, engine, tiers = worker(overrides)  # a fresh worker: the disk index is rebuilt
    try:
        assert [t.name for t in tiers] == ["LocalCPUBackend", "LocalDiskBackend"]
        assert len(tiers[1]) == 4 and len(tiers[0]) == 0
        assert retrieve_equal(engine, cache(1))
    finally:
        shutdown(container)


def test_cpu_valkey_deployment(valkey_server):
    store_clear_cpu_retrieve(
        ["deployment=cpu_valkey", f"remote_url=valkey://127.0.0.1:{valkey_server.port}"],
        ["RemoteBackend"])


def test_cpu_disk_valkey_cluster_deployment(tmp_path):
    cluster = ValkeyClusterProcesses(tmp_path / "cluster").start()
    try:
        store_clear_cpu_retrieve(
            ["deployment=cpu_disk_valkey_cluster", f"local_disk={tmp_path}/disk",
             f"remote_url='{cluster.url}'"],
            ["LocalDiskBackend", "RemoteBackend"])
        assert all(s > 0 for s in cluster.dbsizes())
    finally:
        cluster.stop()


@pytest.mark.parametrize("connector", ["lm", "fs"])
def test_other_remote_connectors(connector, tmp_path):
    server = LMServerProcess().start() if connector == "lm" else None
    url = f"lm://127.0.0.1:{server.port}" if server else f"fs://{tmp_path}/shared"
    try:
        store_clear_cpu_retrieve(
            ["storage/backends=[local_cpu,remote]", f"remote_connector={connector}",
             f"remote_url={url}"], ["RemoteBackend"])
    finally:
        if server:
            server.kill()


def test_remote_down_costs_hits_only(tmp_path):
    container, engine, tiers = worker(
        ["deployment=cpu_valkey", "remote_url=valkey://127.0.0.1:1", "blocking_timeout_secs=1"])
    try:
        src = cache(2)
        assert engine.store(TOKENS, kvcaches=src, slot_mapping=SLOTS) == 4 * C
        flush(tiers)
        assert retrieve_equal(engine, src)     # the CPU tier still serves
        tiers[0].clear()
        assert engine.lookup(TOKENS) == 0
        ret = engine.retrieve(TOKENS, kvcaches=cache(), slot_mapping=SLOTS)
        assert not bool(ret.any())             # recompute, no exception
    finally:
        shutdown(container)
