"""KVCacheLayout: construction checks and layer-tensor validation messages."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout


def test_fields_and_derived_values():
    layout = KVCacheLayout("cpu_packed", block_size=16, num_kv_heads=4, head_size=64)
    assert layout.hidden_dim == 256 and not layout.is_mla
    assert layout.expected_shape() == "[num_blocks, 4, 16, 128]"
    t = torch.zeros(10, 4, 16, 128)
    assert layout.num_blocks(t) == 10 and layout.num_slots(t) == 160
    legacy = KVCacheLayout("legacy_5d", 16, 4, 64)
    assert legacy.num_blocks(torch.zeros(2, 7, 16, 4, 64)) == 7
    assert legacy.expected_shape() == "[2, num_blocks, 16, 4, 64]"
    assert KVCacheLayout("mla", 16, 1, 576).expected_shape() == "[num_blocks, 16, 576]"
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.kind = "mla"  # frozen


@pytest.mark.parametrize(
    "args, msg",
    [
        (("paged", 16, 4, 64), "kind must be one of"),
        (("cpu_packed", 0, 4, 64), "block_size must be an int >= 1, got 0"),
        (("cpu_packed", 16, True, 64), "num_kv_heads must be an int >= 1, got True"),
        (("flash_packed", 16, 4, 6.0), "head_size must be an int >= 1, got 6.0"),
        (("mla", 16, 2, 576), "needs num_kv_heads == 1, got 2"),
    ],
)
def test_bad_fields_rejected(args, msg):
    with pytest.raises(ValueError, match=msg):
        KVCacheLayout(*args)


def test_check_tensor_names_shape_dtype_and_expected():
    layout = KVCacheLayout("flash_packed", 16, 4, 64)
    layout.check_tensor(torch.zeros(3, 4, 16, 128, dtype=torch.bfloat16), torch.bfloat16)
    expected = r"shape \(3, 4, 16, 64\).*expected \[num_blocks, 4, 16, 128\]"
    with pytest.raises(ValueError, match=expected):
        layout.check_tensor(torch.zeros(3, 4, 16, 64))
    with pytest.raises(ValueError, match=r"dtype torch.float16, expected torch.bfloat16"):
        layout.check_tensor(torch.zeros(3, 4, 16, 128, dtype=torch.float16), torch.bfloat16)
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        layout.check_tensor([1, 2])
    legacy = KVCacheLayout("legacy_5d", 16, 4, 64)
    with pytest.raises(ValueError, match=r"shape \(3, 3, 16, 4, 64\)"):
        legacy.check_tensor(torch.zeros(3, 3, 16, 4, 64))


def test_check_tensor_rejects_strides_the_views_cannot_use():
    layout = KVCacheLayout("cpu_packed", 4, 2, 8)
    non_page = torch.zeros(3, 2, 16, 4).transpose(2, 3)  # [3, 2, 4, 16] with page not packed
    with pytest.raises(ValueError, match="strides .* each \\[N, 2D\\] page contiguous"):
        layout.check_tensor(non_page)
    flash = KVCacheLayout("flash_packed", 4, 2, 8)
    with pytest.raises(ValueError, match="last dim contiguous"):
        flash.check_tensor(torch.zeros(3, 2, 16, 4).transpose(2, 3))
