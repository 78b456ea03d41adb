"""The whole CacheBlend load path on CUDA equals the CPU path (issue 9, marker ``gpu``).

Both sides run what the vLLM worker runs — a container with ``blend=cacheblend`` (segment
token database, VLLMBufferLayerwiseGPUConnector, CacheBlendRunner), prompt A's K/V stored as
segments, prompt B blended by ``CacheBlendRunner.blend`` into paged KV — once with CPU paged
tensors (cpu_packed layout, torch paths) and once on the GPU (flash_packed layout, pinned CPU
tier, per-layer H2D on the load stream, CuPy RoPE kernel, CUDA attention kernels). The same
weights and the same stored K/V go into both; the paged K/V written for prompt B must agree
within float tolerance, and the tokens selected for recompute must be the same.
"""

from __future__ import annotations

import pytest
import torch

from blend_torch_model import DOCS, PROMPT_A, PROMPT_B, SEP, build
from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv
from lmcache.metadata import LMCacheMetadata

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

L, HEADS, H, D, BS, BLOCKS = 4, 4, 2, 16, 4, 60


def blend_on(device: str, dtype: torch.dtype, ratio: float, check_layers=(1,)):
    """``(paged K/V of prompt B [2, L, N, H*D] on CPU, recomputed indices)`` after a blend on
    ``device``; prompt A's K/V is the CPU float32 prefill of the same model, cast to dtype."""
    meta = LMCacheMetadata("org/tiny", 1, 0, dtype, (L, 2, 16, H, D))
    kind = "flash_packed" if device == "cuda" else "cpu_packed"
    layout = KVCacheLayout(kind, BS, H, D)
    shape = (BLOCKS, H, BS, 2 * D)
    with torch.inference_mode():
        ref = build(layers=L, hidden=HEADS * D, heads=HEADS, kv_heads=H, seed=0)
        from lmcache.blend.layerwise_model import LayerwiseModel
        kv_a = LayerwiseModel(ref).prefill(torch.tensor(PROMPT_A))
    model = build(layers=L, hidden=HEADS * D, heads=HEADS, kv_heads=H, seed=0, dtype=dtype,
                  device=device)
    cfg = compose_config([
        "chunk_size=16", "max_local_cpu_size=0.01", "blend=cacheblend",
        f"token_database.separator_tokens=[{SEP[0]},{SEP[1]}]", f"gpu_connector.device={device}",
        f"blend.blend_check_layers=[{','.join(map(str, check_layers))}]",
        f"blend.blend_recompute_ratios=[{ratio}]", "blend.blend_min_tokens=1"])
    container = build_worker_container(cfg, meta, layout)
    try:
        engine, runner = container.engine(), container.blender()
        runner.attach_model(model)
        caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]
        slots_a = (torch.arange(len(PROMPT_A)) + 5).to(device)
        stacked = torch.stack([torch.stack((k, v)) for k, v in kv_a], dim=1)  # [2, L, N, HD]
        scatter_kv(caches, slots_a, layout, stacked.to(device=device, dtype=dtype))
        assert engine.store(PROMPT_A, kvcaches=caches, slot_mapping=slots_a) == sum(map(len,
                                                                                       DOCS))
        slots_b = (torch.arange(len(PROMPT_B)) + 2 * len(PROMPT_A)).flip(0).to(device)
        got = runner.blend(torch.tensor(PROMPT_B), caches, slots_b)
        assert got is not None and bool(got.all())
        out = gather_kv(caches, slots_b, layout).float().cpu()
        return out, runner.last_recomputed.cpu()
    finally:
        shutdown(container)


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.5, 1.0])
def test_cuda_blend_path_equals_cpu_path_float32(ratio):
    cpu, cpu_sel = blend_on("cpu", torch.float32, ratio)
    gpu, gpu_sel = blend_on("cuda", torch.float32, ratio)
    assert torch.equal(cpu_sel, gpu_sel)
    assert cpu.abs().sum() > 0
    torch.testing.assert_close(gpu, cpu, atol=2e-4, rtol=2e-4)


def test_cuda_blend_path_equals_cpu_path_with_several_check_layers():
    cpu, cpu_sel = blend_on("cpu", torch.float32, 0.5, check_layers=(1, 2))
    gpu, gpu_sel = blend_on("cuda", torch.float32, 0.5, check_layers=(1, 2))
    assert torch.equal(cpu_sel, gpu_sel)
    torch.testing.assert_close(gpu, cpu, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_cuda_blend_path_equals_cpu_path_bfloat16(ratio):
    cpu, cpu_sel = blend_on("cpu", torch.bfloat16, ratio)
    gpu, gpu_sel = blend_on("cuda", torch.bfloat16, ratio)
    assert torch.equal(cpu_sel, gpu_sel)
    torch.testing.assert_close(gpu, cpu, atol=6e-2, rtol=6e-2)
