"""Blender + LayerwiseModel on a plain-torch model with vLLM's attribute names (no vLLM needed).

Runs on CPU; the same tests run on CUDA (marker ``gpu``) on the device. The vLLM model objects
are exercised in tests/integration/blend/test_blender_vllm.py.
"""

import types

import pytest
import torch

from blend_torch_model import build
from lmcache.blend.blender import Blender
from lmcache.blend.layerwise_model import LayerwiseModel

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]
ARCHS = ["LlamaForCausalLM", "Qwen3ForCausalLM"]
T = 48


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _setup(arch, device, dtype=torch.float32):
    model = LayerwiseModel(build(arch, dtype=dtype, device=device))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (T,), generator=gen).to(device)
    return model, ids


def _clone(kvs):
    return [(k.clone(), v.clone()) for k, v in kvs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_one_equals_full_prefill_whatever_the_cache(arch, device):
    model, ids = _setup(arch, device)
    full = model.prefill(ids)
    garbage = [(torch.randn_like(k) * 5, torch.randn_like(v) * 5) for k, v in full]
    out = Blender(model, [1], [1.0]).blend(ids, garbage)
    assert len(out) == model.num_layers
    for (k, v), (fk, fv) in zip(out, full):
        torch.testing.assert_close(k, fk, **_tol(k.dtype))
        torch.testing.assert_close(v, fv, **_tol(k.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_zero_with_same_context_cache_returns_the_cache(arch, device):
    model, ids = _setup(arch, device)
    cache = model.prefill(ids)
    blender = Blender(model, 1, 0.0)
    out = blender.blend(ids, _clone(cache))
    assert blender.last_recomputed.numel() == 0
    for (k, v), (ck, cv) in zip(out, cache):
        torch.testing.assert_close(k, ck, **_tol(k.dtype))
        torch.testing.assert_close(v, cv, **_tol(k.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_selected_tokens_are_recomputed_and_the_rest_kept(device):
    model, ids = _setup("LlamaForCausalLM", device)
    full = model.prefill(ids)
    # a cache that is exact except at tokens 5, 20, 33 (K of layer >= 1 perturbed)
    cache = _clone(full)
    bad = torch.tensor([5, 20, 33])
    for k, v in cache[1:]:
        k[bad] += 3.0
        v[bad] -= 3.0
    uncached = torch.zeros(T, dtype=torch.bool, device=device)
    uncached[[10, 11]] = True       # e.g. a separator: zeroed in the cache, always recomputed
    for k, v in cache:
        k[uncached] = 0
        v[uncached] = 0
    blender = Blender(model, [1], [3 / (T - 2)])   # 3 of the 46 cached tokens
    seen = []

    class Lazy:
        def __getitem__(self, i):
            seen.append(i)
            return cache[i]

    out = []
    for i, kv in blender.blend_layerwise(ids, Lazy(), uncached):
        out.append(kv)
        # the check layer is asked for before any compute (its load overlaps layers 0..1),
        # later layers only when they are blended
        assert seen == [1] + list(range(1, i + 1))
    assert seen == [1, 1, 2, 3]
    assert blender.last_recomputed.tolist() == [5, 10, 11, 20, 33]
    assert out[2][0] is cache[2][0]       # combined in place in the caller's buffers
    for k, v in out[2:]:
        assert k[[10, 11]].abs().sum() > 0       # no zero gap left
    # the perturbed tokens were the only wrong cached ones: the blend is the full prefill
    for (k, v), (fk, fv) in zip(out, full):
        torch.testing.assert_close(k, fk, **_tol(k.dtype))
        torch.testing.assert_close(v, fv, **_tol(k.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_positions_shift_rope_and_match_a_prefill_at_those_positions(device):
    model, ids = _setup("Qwen3ForCausalLM", device)
    pos = torch.arange(T, device=device) + 100
    at100 = model.prefill(ids, pos)
    at0 = model.prefill(ids)
    assert not torch.allclose(at100[0][0], at0[0][0])
    moved = at0[0][0].clone()
    model.fused_rotary_emb(torch.arange(T), pos, moved)   # layer 0 K: token + position only
    torch.testing.assert_close(moved, at100[0][0], atol=1e-4, rtol=1e-4)
    out = Blender(model, [1], [1.0]).blend(ids, _clone(at0), positions=pos)
    torch.testing.assert_close(out[3][1], at100[3][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_model_blends_in_its_dtype(device):
    model, ids = _setup("LlamaForCausalLM", device, torch.bfloat16)
    full = model.prefill(ids)
    out = Blender(model, [1], [1.0]).blend(ids, _clone(full))
    assert out[3][0].dtype == torch.bfloat16
    torch.testing.assert_close(out[3][0], full[3][0], **_tol(torch.bfloat16))


def test_unsupported_architecture_is_refused_by_name():
    with pytest.raises(ValueError, match="'GPT2LMHeadModel'.*supported"):
        LayerwiseModel(build("GPT2LMHeadModel"))


def test_unrepositionable_rope_and_sliding_window_are_refused():
    m = build()
    m.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="LlamaForCausalLM.*'yarn'"):
        LayerwiseModel(m)
    m = build("Qwen3ForCausalLM")
    m.model.layers[2].self_attn.attn = types.SimpleNamespace(sliding_window=128)
    with pytest.raises(ValueError, match="Qwen3ForCausalLM: layer 2 uses sliding-window"):
        LayerwiseModel(m)
    m = build()
    m.model.layers[0].self_attn.total_num_heads = 8     # vLLM's attribute: a TP=2 shard
    with pytest.raises(ValueError, match=r"tensor-parallel shard \(4 of 8 attention heads\)"):
        LayerwiseModel(m)


def test_bad_blender_arguments_are_refused():
    model, ids = _setup("LlamaForCausalLM", "cpu")
    with pytest.raises(ValueError, match="outside the model's layers 0..3"):
        Blender(model, [4], [0.1])
    with pytest.raises(ValueError,
                       match=r"blend_check_layers=\[2, 1\] must be strictly increasing"):
        Blender(model, [2, 1], [0.1])
    with pytest.raises(ValueError,
                       match=r"blend_check_layers=\[1, 1\] must be strictly increasing"):
        Blender(model, [1, 1], [0.1])
    with pytest.raises(ValueError, match="blend_check_layers is empty"):
        Blender(model, [], [0.1])
    with pytest.raises(ValueError, match="layer -1 is outside"):
        Blender(model, [-1, 2], [0.1])
    with pytest.raises(ValueError, match="must hold ints, got '1'"):
        Blender(model, ["1"], [0.1])
    with pytest.raises(ValueError, match="ratio"):
        Blender(model, [1], [1.5])
    with pytest.raises(ValueError, match=r"one ratio, or one per check layer \(1\)"):
        Blender(model, [1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"one ratio, or one per check layer \(2\)"):
        Blender(model, [1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one ratio, or one per check layer"):
        Blender(model, [1, 2], [])
    blender = Blender(model, [1], [0.1])
    cache = model.prefill(ids)
    with pytest.raises(ValueError, match=r"cached_kv\[1\] k must be \[48, 32\]"):
        blender.blend(ids, [(k[:10], v) for k, v in cache])
    with pytest.raises(ValueError, match="strictly increasing"):
        blender.blend(ids, cache, positions=torch.arange(T).flip(0))
    with pytest.raises(ValueError, match="uncached must be a bool tensor"):
        blender.blend(ids, cache, uncached=torch.zeros(T))


@pytest.mark.parametrize("device", DEVICES)
def test_several_check_layers_narrow_the_selection_at_each(device):
    """Check layers [1, 2]: the cache is exact except tokens 5, 20, 33 from layer 2 on; layer 1
    keeps half of the cached tokens, layer 2 keeps 3 of those, which must be the perturbed
    ones (they are the only ones whose cached K deviates there) — and the blend then equals
    the full prefill."""
    model, ids = _setup("LlamaForCausalLM", device)
    full = model.prefill(ids)
    cache = _clone(full)
    bad = torch.tensor([5, 20, 33])
    for k, v in cache[2:]:
        k[bad] += 3.0
        v[bad] -= 3.0
    for k, v in cache[:2]:   # layer 1 deviates everywhere a little, most at the bad tokens
        k += 0.01 * torch.arange(T, device=device, dtype=k.dtype)[:, None]
        k[bad] += 1.0
    blender = Blender(model, [1, 2], [0.5, 3 / 24])
    out = blender.blend(ids, cache)
    first, second = blender.last_selections
    assert first.numel() == T // 2 and set(bad.tolist()) <= set(first.tolist())
    assert second.tolist() == [5, 20, 33]
    assert blender.last_recomputed is second
    for (k, v), (fk, fv) in zip(out, full):
        torch.testing.assert_close(k, fk, **_tol(k.dtype))
        torch.testing.assert_close(v, fv, **_tol(k.dtype))


@pytest.mark.parametrize("ratios", [[0.25], [0.25, 1.0]])
def test_a_second_check_layer_keeping_all_equals_one_check_layer(ratios):
    """A second check layer at ratio 1 keeps every token it sees; one ratio is used at every
    check layer (LMCache's first-ratio rule), so [0.25] at [1, 2] recomputes 25 % of 25 %."""
    model, ids = _setup("Qwen3ForCausalLM", "cpu")
    garbage = [(torch.randn_like(k), torch.randn_like(v)) for k, v in model.prefill(ids)]
    one = Blender(model, [1], [0.25])
    two = Blender(model, [1, 2], ratios)
    out_one, out_two = one.blend(ids, _clone(garbage)), two.blend(ids, _clone(garbage))
    assert one.last_recomputed.numel() == 12
    if ratios == [0.25]:
        assert two.last_recomputed.numel() == 3
        assert set(two.last_recomputed.tolist()) <= set(one.last_recomputed.tolist())
        return
    assert torch.equal(two.last_recomputed, one.last_recomputed)
    for a, b in zip(out_one, out_two):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_uncached_tokens_survive_every_check_layer():
    model, ids = _setup("LlamaForCausalLM", "cpu")
    cache = model.prefill(ids)
    uncached = torch.zeros(T, dtype=torch.bool)
    uncached[[0, 1, 40]] = True
    blender = Blender(model, [0, 1, 3], 0.0)
    out = blender.blend(ids, _clone(cache), uncached=uncached)
    assert [s.tolist() for s in blender.last_selections] == [[0, 1, 40]] * 3
    assert all(k[[0, 1, 40]].abs().sum() > 0 for k, _ in out)
