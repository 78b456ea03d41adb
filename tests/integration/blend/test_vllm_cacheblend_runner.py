"""``blend=cacheblend`` without vLLM: the container-built CacheBlendRunner and
BlendConnectorWorker over a plain-torch Llama-shaped model (its class and attribute names are
vLLM's), on CPU in well under a second.

A prompt of three documents is prefilled by the model and stored (segments with positions);
for a prompt with the documents in another order, the runner's lookup answers N - 1 (vLLM
computes the last token), its blend fills vLLM's paged cache with the full-prefill K/V at
ratio 1, and at ratio 0 recomputes exactly the uncached tokens (separators, system prompt,
question). The end-to-end run through vLLM is test_vllm_cacheblend.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lmcache.blend.layerwise_model import LayerwiseModel
from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv
from lmcache.integration.vllm.cacheblend import CacheBlendRunner
from lmcache.integration.vllm.blend_worker import BlendConnectorWorker
from lmcache.integration.vllm.specs import LoadSpec, ReqMeta

_spec = importlib.util.spec_from_file_location(
    "blend_torch_model",
    Path(__file__).resolve().parents[2] / "unit" / "blend" / "blend_torch_model.py")
torch_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_model)

L, H, D = torch_model.L, torch_model.H, torch_model.D
BS, BLOCKS = torch_model.BS, torch_model.BLOCKS
SEP, META, LAYOUT = torch_model.SEP, torch_model.META, torch_model.LAYOUT
DOCS, SYSTEM, QUESTION = torch_model.DOCS, torch_model.SYSTEM, torch_model.QUESTION
join, PROMPT_A, PROMPT_B = torch_model.join, torch_model.PROMPT_A, torch_model.PROMPT_B


def paged(kvs=None, slots=None):
    caches = [torch.zeros(BLOCKS, H, BS, 2 * D) for _ in range(L)]
    if kvs is not None:
        scatter_kv(caches, slots, LAYOUT, torch.stack([torch.stack(kv) for kv in kvs], dim=1))
    return caches


@pytest.fixture(scope="module")
def setup():
    vllm_model = torch_model.build("LlamaForCausalLM", layers=L, hidden=64, heads=4, kv_heads=H)
    cfg = compose_config(["chunk_size=16", "max_local_cpu_size=0.01", "blend=cacheblend",
                          f"token_database.separator_tokens=[{SEP[0]},{SEP[1]}]",
                          "gpu_connector.device=cpu", "blend.blend_min_tokens=20",
                          "blend.blend_recompute_ratios=[1.0]"])
    container = build_worker_container(cfg, META, LAYOUT)
    runner = container.blender()
    engine = container.engine()
    assert isinstance(runner, CacheBlendRunner) and engine.gpu_connector.rotary is None
    runner.attach_model(vllm_model)      # the one late-bound collaborator
    assert engine.gpu_connector.rotary is None   # the model's RoPE is passed per retrieve
    slots = torch.arange(len(PROMPT_A)) + 7
    with torch.inference_mode():
        kvs = runner.model.prefill(torch.tensor(PROMPT_A))
    assert engine.store(PROMPT_A, kvcaches=paged(kvs, slots), slot_mapping=slots) == len(PROMPT_A) - 4
    yield runner, engine
    shutdown(container)


def test_lookup_answers_all_but_the_last_token_or_nothing(setup):
    runner, _ = setup
    assert runner.lookup(PROMPT_B) == len(PROMPT_B) - 1          # 33 cached tokens >= 20
    assert runner.lookup(join(SYSTEM, DOCS[1], QUESTION)) == 0   # 12 cached tokens < 20
    assert runner.lookup(join(SYSTEM, QUESTION)) == 0


def _load(runner, engine, ratio):
    runner.ratio = ratio
    n = len(PROMPT_B) - 1
    slots = torch.arange(len(PROMPT_B)) + 60
    caches = paged()
    worker = BlendConnectorWorker(engine, caches, BS, runner)
    req = ReqMeta(req_id="b", token_ids=torch.tensor(PROMPT_B[:n]), slot_mapping=slots[:n],
                  load_spec=LoadSpec(vllm_cached_tokens=0, lmcache_cached_tokens=n),
                  load_from=0, load_end=n, load_fetch_end=n)
    worker._load_one(req)
    return worker, gather_kv(caches, slots[:n], LAYOUT), n


def test_ratio_one_writes_the_full_prefill(setup):
    runner, engine = setup
    worker, got, n = _load(runner, engine, 1.0)
    with torch.inference_mode():
        fresh = runner.model.prefill(torch.tensor(PROMPT_B[:n]))
    assert worker.loaded_tokens == n and worker.blend_failures == 0
    assert worker.take_invalid_block_ids() == set()
    assert runner.last_recomputed.tolist() == list(range(n))
    for i in range(L):
        torch.testing.assert_close(got[0, i], fresh[i][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1, i], fresh[i][1], atol=1e-4, rtol=1e-4)


def test_ratio_zero_recomputes_only_the_uncached_tokens(setup):
    runner, engine = setup
    worker, got, n = _load(runner, engine, 0.0)
    cached = torch.zeros(n, dtype=torch.bool)
    start = len(SYSTEM) + 2
    cached[start:start + len(DOCS[2])] = True
    start += len(DOCS[2]) + 2
    cached[start:start + len(DOCS[0])] = True
    assert runner.last_recomputed.tolist() == torch.nonzero(~cached).flatten().tolist()
    assert worker.loaded_tokens == n and got[:, 2:, ~cached].abs().sum() > 0


def test_a_prompt_without_cached_segments_is_left_to_vllm(setup):
    runner, engine = setup
    worker = BlendConnectorWorker(engine, paged(), BS, runner)
    ids = join(SYSTEM, QUESTION)
    req = ReqMeta(req_id="c", token_ids=torch.tensor(ids), slot_mapping=torch.arange(len(ids)),
                  load_spec=LoadSpec(vllm_cached_tokens=0, lmcache_cached_tokens=len(ids)),
                  load_from=0, load_end=len(ids), load_fetch_end=len(ids))
    worker._load_one(req)
    assert worker.blend_failures == 1 and worker.loaded_tokens == 0
    assert worker.take_invalid_block_ids() == set(range(0, -(-len(ids) // BS)))


def test_unsupported_model_is_refused_with_its_name(setup):
    runner, _ = setup

    class GPT2LMHeadModel(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        CacheBlendRunner(runner.engine, runner.gpu_connector).attach_model(GPT2LMHeadModel())
    assert isinstance(runner.model, LayerwiseModel)


def test_model_is_bound_once_by_constructor_or_attach_model(setup):
    runner, engine = setup
    unbound = CacheBlendRunner(engine, engine.gpu_connector)
    with pytest.raises(RuntimeError, match="no model: give vllm_model= or bind"):
        unbound.blend(torch.tensor(PROMPT_B[:-1]), [], torch.arange(len(PROMPT_B) - 1))
    with pytest.raises(RuntimeError, match="already has a model .LlamaForCausalLM."):
        runner.attach_model(runner.model.vllm_model)
    injected = CacheBlendRunner(engine, engine.gpu_connector, blend_check_layers=[1, 2],
                                blend_recompute_ratios=[0.5, 0.5],
                                vllm_model=runner.model.vllm_model)
    assert injected.blender.check_layers == [1, 2] and injected.model.num_layers == L
    with pytest.raises(ValueError, match="strictly increasing"):
        CacheBlendRunner(engine, engine.gpu_connector, blend_check_layers=[2, 1],
                         vllm_model=runner.model.vllm_model)
