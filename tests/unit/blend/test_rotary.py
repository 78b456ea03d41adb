import functools
from pathlib import Path

import pytest
import torch

from lmcache.blend import FusedRotaryEmb
from lmcache.experiments.trained_model import tiny_model_path

LLAMA3 = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CASES = {
    "default-neox": ({"rope_theta": 10000.0}, True),
    "default-gptj": ({"rope_theta": 10000.0}, False),
    "partial-neox": ({"rope_theta": 1000000.0, "partial_rotary_factor": 0.5}, True),
    "linear-gptj": ({"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}, False),
    "llama3-neox": (LLAMA3, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_vllm_rope_at_new_positions(name):
    """K roped by vLLM's own get_rope at old positions, re-positioned, equals K roped at new."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    params, neox = CASES[name]
    head, heads, n = 128, 4, 96
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(head, 40000, is_neox_style=neox, rope_parameters=dict(params),
                        dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(n, heads * head, generator=gen)
    old = torch.arange(n) + 17
    new = torch.randperm(n, generator=gen) * 300 + 5   # scattered, some before old, up to 28k
    q = torch.zeros(n, heads * head)
    _, k_old = rope.forward_native(old, q.clone(), k.clone())
    _, k_new = rope.forward_native(new, q.clone(), k.clone())
    fused = FusedRotaryEmb.from_rope_parameters(head, params, is_neox_style=neox)
    moved = fused(old, new, k_old.clone())
    err = (moved - k_new).abs().max().item()
    assert err < 2e-3, err   # vLLM's own float32 cos/sin at ~28k positions round to ~1e-3
    near = fused(old, old + 3, k_old.clone())
    _, k_near = rope.forward_native(old + 3, q.clone(), k.clone())
    assert (near - k_near).abs().max().item() < 1e-5
    if params.get("partial_rotary_factor"):  # channels past rotary_dim are untouched
        view = moved.view(n, heads, head)
        assert torch.equal(view[..., 64:], k_old.view(n, heads, head)[..., 64:])


@functools.lru_cache(maxsize=1)
def _trained():
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = str(tiny_model_path("trained"))
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _layer0_k(model, ids, start):
    """Post-RoPE K of layer 0 for ``ids`` at positions start..start+n, [n, kv_heads*head]."""
    n = ids.numel()
    with torch.no_grad():
        out = model(ids[None], position_ids=torch.arange(start, start + n)[None], use_cache=True)
    keys = out.past_key_values.layers[0].keys[0]          # [kv_heads, n, head]
    return keys.transpose(0, 1).reshape(n, -1).clone(), out.past_key_values


def test_repositioned_layer0_k_equals_fresh_k_of_trained_model():
    model, tok = _trained()
    text = Path("/usr/share/common-licenses/Apache-2.0").read_text()[2000:3200]
    ids = torch.tensor(tok.encode(text, add_special_tokens=False)[:200])
    n = ids.numel()
    assert n == 200
    p, q = 7, 1500
    k_p, cache_p = _layer0_k(model, ids, p)
    k_q, cache_q = _layer0_k(model, ids, q)
    assert (k_p - k_q).abs().max().item() > 1.0    # position really changes K
    cfg = model.config
    fused = FusedRotaryEmb.from_rope_parameters(cfg.head_dim, cfg.rope_parameters)
    moved = fused(torch.arange(p, p + n), torch.arange(q, q + n), k_p.clone())
    assert (moved - k_q).abs().max().item() < 1e-4
    back = fused(torch.arange(q, q + n), torch.arange(p, p + n), moved.clone())
    assert (back - k_p).abs().max().item() < 1e-4
    # RoPE attention depends on relative positions only: a uniform shift rotates every layer's K
    k3_p = cache_p.layers[3].keys[0].transpose(0, 1).reshape(n, -1)
    k3_q = cache_q.layers[3].keys[0].transpose(0, 1).reshape(n, -1)
    moved3 = fused(torch.arange(p, p + n), torch.arange(q, q + n), k3_p.clone())
    assert (moved3 - k3_q).abs().max().item() < 1e-3


def test_in_another_context_only_layer0_k_is_recovered():
    """CacheBlend's premise: the passage cached alone, moved behind another passage, has the
    fresh layer-0 K exactly, but later layers' K differ (they saw other context)."""
    model, tok = _trained()
    text = Path("/usr/share/common-licenses/Apache-2.0").read_text()
    doc = torch.tensor(tok.encode(text[2000:2600], add_special_tokens=False)[:100])
    other = torch.tensor(tok.encode(text[5000:5600], add_special_tokens=False)[:80])
    n, m = doc.numel(), other.numel()
    k_alone, cache_alone = _layer0_k(model, doc, 0)
    _, cache_ctx = _layer0_k(model, torch.cat([other, doc]), 0)
    cfg = model.config
    fused = FusedRotaryEmb.from_rope_parameters(cfg.head_dim, cfg.rope_parameters)
    for layer, bound in ((0, 1e-4), (1, None)):
        alone = cache_alone.layers[layer].keys[0].transpose(0, 1).reshape(n, -1)
        fresh = cache_ctx.layers[layer].keys[0].transpose(0, 1).reshape(m + n, -1)[m:]
        moved = fused(torch.arange(n), torch.arange(m, m + n), alone.clone())
        err = (moved - fresh).abs().max().item()
        if bound is None:
            assert err > 0.05, err   # needs recompute: what the Blender's check layer measures
        else:
            assert err < bound, err


def test_bf16_and_3d_in_place():
    fused = FusedRotaryEmb(64, base=10000.0)
    k = torch.randn(10, 2, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = k.float().clone()
    out = fused(torch.arange(10), torch.arange(10) + 50, k)
    assert out is k and out.dtype == torch.bfloat16
    back = fused(torch.arange(10) + 50, torch.arange(10), k.clone())
    assert (back.float() - ref).abs().max().item() < 0.05   # two bf16 roundings
    same = fused(torch.arange(10), torch.arange(10), k.clone())
    assert torch.equal(same, k)                              # zero delta is the identity
    assert fused(torch.arange(0), torch.arange(0), torch.empty(0, 128)).shape == (0, 128)


def test_unsupported_rope_and_bad_inputs_are_refused():
    for params, match in (
            ({"rope_type": "yarn", "factor": 4.0}, "RoPE type 'yarn' cannot be re-positioned"),
            ({"type": "dynamic", "factor": 2.0}, "RoPE type 'dynamic' cannot be re-positioned"),
            ({"rope_type": "longrope"}, "'longrope'"),
            ({"mrope_section": [16, 24, 24]}, "mrope_section"),
            ({"rope_type": "linear"}, "needs a positive factor, got None"),
            ({"rope_type": "llama3", "factor": 8.0}, "needs a positive low_freq_factor"),
            ({"partial_rotary_factor": 1.5}, "partial_rotary_factor=1.5")):
        with pytest.raises(ValueError, match=match):
            FusedRotaryEmb.from_rope_parameters(128, params)
    with pytest.raises(ValueError, match="rotary_dim must be an even int"):
        FusedRotaryEmb(64, rotary_dim=33)
    with pytest.raises(ValueError, match="head_size must be a positive int"):
        FusedRotaryEmb(0)
    fused = FusedRotaryEmb(64)
    k = torch.zeros(4, 128)
    with pytest.raises(ValueError, match="new_positions must be a 1-D tensor of 4 positions"):
        fused(torch.arange(4), torch.arange(3), k)
    with pytest.raises(ValueError, match="old_positions must be an integer tensor"):
        fused(torch.arange(4.0), torch.arange(4), k)
    with pytest.raises(ValueError, match=r"k must be \[num_tokens, num_heads\*64\]"):
        fused(torch.arange(4), torch.arange(4), torch.zeros(4, 100))
    with pytest.raises(ValueError, match="k must be a floating tensor"):
        fused(torch.arange(4), torch.arange(4), torch.zeros(4, 128, dtype=torch.int32))
