import pytest
import torch

from lmcache.metadata import LMCacheMetadata


def test_properties():
    md = LMCacheMetadata("m", 2, 1, torch.bfloat16, (32, 2, 256, 8, 128))
    assert (md.num_layers, md.chunk_size, md.num_kv_heads, md.head_size, md.hidden_dim) == (
        32, 256, 8, 128, 1024)
    assert md.role == "worker" and md.use_mla is False
    assert hash(md) == hash(LMCacheMetadata("m", 2, 1, torch.bfloat16, [32, 2, 256, 8, 128]))


def test_mla():
    md = LMCacheMetadata("ds", 1, 0, torch.bfloat16, (61, 1, 256, 1, 576), use_mla=True)
    assert md.hidden_dim == 576
    with pytest.raises(ValueError, match="kv_shape\\[1\\]"):
        LMCacheMetadata("ds", 1, 0, torch.bfloat16, (61, 2, 256, 1, 576), use_mla=True)


@pytest.mark.parametrize("bad", [
    dict(model_name=""), dict(world_size=0), dict(worker_id=2), dict(kv_dtype="bf16"),
    dict(kv_shape=(1, 2, 3, 4)), dict(kv_shape=(1, 2, 0, 4, 5)), dict(role="both"),
])
def test_bad_values(bad):
    fields = dict(model_name="m", world_size=2, worker_id=1, kv_dtype=torch.half,
                  kv_shape=(2, 2, 16, 2, 8))
    fields.update(bad)
    with pytest.raises((ValueError, TypeError)):
        LMCacheMetadata(**fields)
