"""The CacheBlend data path feeding the Blender (issue 9), with a real (plain torch,
Llama-shaped) model: KV of a prompt of three documents prefilled by the model is stored
through a container-built engine; for a prompt with the documents in another order, the
retrieved layer-0 K/V of the reused tokens equal what the model computes there afresh (layer 0
depends only on token and position), and BlendLayerKV + Blender + write_layer fill the paged
cache with the full-prefill K/V at ratio 1."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lmcache.blend.blender import Blender
from lmcache.blend.layerwise_model import LayerwiseModel
from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.engine.blend_layers import BlendLayerKV
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv

_spec = importlib.util.spec_from_file_location(
    "blend_torch_model", Path(__file__).resolve().parents[1] / "blend" / "blend_torch_model.py")
torch_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_model)

L, H, D = torch_model.L, torch_model.H, torch_model.D
BS, BLOCKS = torch_model.BS, torch_model.BLOCKS
SEP, META, LAYOUT = torch_model.SEP, torch_model.META, torch_model.LAYOUT
DOCS, SYSTEM, QUESTION = torch_model.DOCS, torch_model.SYSTEM, torch_model.QUESTION
join, PROMPT_A, PROMPT_B = torch_model.join, torch_model.PROMPT_A, torch_model.PROMPT_B


def to_paged(kvs, slots):
    caches = [torch.zeros(BLOCKS, H, BS, 2 * D) for _ in range(L)]
    kv = torch.stack([torch.stack((k, v)) for k, v in kvs], dim=1)   # [2, L, N, H*D]
    scatter_kv(caches, slots, LAYOUT, kv)
    return caches


@pytest.fixture(scope="module")
def setup():
    model = LayerwiseModel(torch_model.build("LlamaForCausalLM", layers=L, hidden=64, heads=4,
                                             kv_heads=H))
    cfg = compose_config(["chunk_size=16", "max_local_cpu_size=0.01", "token_database=segment",
                          f"token_database.separator_tokens=[{SEP[0]},{SEP[1]}]",
                          "gpu_connector=vllm_buffer_layerwise", "gpu_connector.device=cpu",
                          "gpu_connector.rope_parameters={rope_theta:10000.0}"])
    container = build_worker_container(cfg, META, LAYOUT)
    engine = container.engine()
    slots = torch.arange(len(PROMPT_A)) + 7
    with torch.inference_mode():
        kvs = model.prefill(torch.tensor(PROMPT_A))
    engine.store(PROMPT_A, kvcaches=to_paged(kvs, slots), slot_mapping=slots)
    yield model, engine
    shutdown(container)


def test_reused_layer0_kv_equals_the_models_fresh_kv(setup):
    model, engine = setup
    with torch.inference_mode():
        fresh = model.prefill(torch.tensor(PROMPT_B))
    kv = BlendLayerKV(engine.retrieve_layers_for_blend(PROMPT_B), L)
    try:
        reused = kv.mask
        assert int(reused.sum()) == len(DOCS[0]) + len(DOCS[2])
        k0, v0 = kv[0]
        torch.testing.assert_close(k0[reused], fresh[0][0][reused], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v0[reused], fresh[0][1][reused], atol=1e-5, rtol=1e-5)
        assert not k0[~reused].any()
        k3, _ = kv[3]                          # deeper layers carry the old context: differ
        assert (k3[reused] - fresh[3][0][reused]).abs().max() > 1e-2
        with pytest.raises(IndexError, match="increasing order"):
            kv[1]
    finally:
        kv.close()


@pytest.mark.parametrize("ratio", [1.0, 0.15])
def test_blender_over_the_retrieved_layers_fills_the_paged_cache(setup, ratio):
    model, engine = setup
    ids = torch.tensor(PROMPT_B)
    with torch.inference_mode():
        fresh = model.prefill(ids)
    slots = torch.arange(len(PROMPT_B)) + 60
    caches = [torch.zeros(BLOCKS, H, BS, 2 * D) for _ in range(L)]
    kv = BlendLayerKV(engine.retrieve_layers_for_blend(ids), L)
    blender = Blender(model, 1, ratio)
    try:
        for i, (k, v) in blender.blend_layerwise(ids, kv, uncached=~kv.mask):
            engine.gpu_connector.write_layer(torch.stack((k, v)), caches[i], slot_mapping=slots)
    finally:
        kv.close()
    got = gather_kv(caches, slots, LAYOUT)                     # [2, L, N, H*D]
    for i in range(L):
        if ratio == 1.0 or i <= 1:          # ratio 1, or up to the check layer: exact prefill
            torch.testing.assert_close(got[0, i], fresh[i][0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got[1, i], fresh[i][1], atol=1e-4, rtol=1e-4)
    if ratio < 1.0:
        kept = ~torch.isin(torch.arange(len(PROMPT_B)), blender.last_recomputed)
        assert kept.any() and not (kept & ~kv.mask).any()  # only reused tokens are kept
        assert got[:, 2:, ~kept].abs().sum() > 0
