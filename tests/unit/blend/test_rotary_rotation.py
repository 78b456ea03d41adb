"""FusedRotaryEmb.rotation + rotate: the blend's load path computes the rotation (cos/sin) of a
request's positions once and applies it to every layer's K; that must equal re-positioning
each layer on its own."""

import pytest
import torch

from lmcache.blend.rotary import FusedRotaryEmb


@pytest.mark.parametrize("neox", [True, False])
def test_one_rotation_applied_to_several_layers_equals_each_call(neox):
    rot = FusedRotaryEmb(16, rotary_dim=8, is_neox_style=neox)
    old, new = torch.arange(5, 37), torch.arange(100, 132)
    layers = [torch.randn(32, 32) for _ in range(3)]
    want = [rot(old, new, k.clone()) for k in layers]
    cos, sin = rot.rotation(old, new, torch.device("cpu"))
    assert cos.shape == sin.shape == (32, 4) and cos.dtype == torch.float32
    for k, w in zip(layers, want):
        out = k.clone()
        assert rot.rotate(out, cos, sin) is out
        assert torch.equal(out, w)


def test_rotate_refuses_a_rotation_of_other_tokens():
    rot = FusedRotaryEmb(16)
    cos, sin = rot.rotation(torch.arange(4), torch.arange(4) + 3, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"cos/sin must be \[5, 8\]"):
        rot.rotate(torch.randn(5, 16), cos, sin)
