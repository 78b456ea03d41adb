"""Cross-group invariants, checked before the graph is built."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lmcache.config import compose_config
from lmcache.config.checks import check_config, chunk_bytes, option_name
from lmcache.metadata import LMCacheMetadata

META = LMCacheMetadata("m", 1, 0, torch.bfloat16, (4, 2, 16, 2, 64))  # 32 KiB chunks


def cfg_with(*overrides, **nodes):
    cfg = compose_config(["chunk_size=16", "max_local_cpu_size=0.01", *overrides])
    for key, node in nodes.items():
        OmegaConf.update(cfg, key.replace("__", "."), node, merge=False)
    return cfg


def test_defaults_pass():
    check_config(cfg_with(), META)
    check_config(cfg_with(), None)
    assert chunk_bytes(META) == 4 * 2 * 16 * 2 * 64 * 2


@pytest.mark.parametrize("value", [0, -16])
def test_chunk_size_must_be_positive(value):
    with pytest.raises(ValueError, match=f"chunk_size must be an integer > 0, got {value}"):
        check_config(cfg_with(f"chunk_size={value}"), None)


def test_chunk_size_must_match_metadata():
    with pytest.raises(ValueError, match=r"chunk_size=32 differs from the chunk size 16"):
        check_config(cfg_with("chunk_size=32"), META, role="scheduler")


def test_allocator_must_hold_one_chunk_and_message_names_both_numbers():
    cfg = cfg_with("max_local_cpu_size=0.00001")  # 10737 bytes < 32768
    with pytest.raises(ValueError) as err:
        check_config(cfg, META)
    message = str(err.value)
    assert "10737 bytes" in message and "32768 bytes" in message and "1e-05" in message
    check_config(cfg, META, role="scheduler")  # the scheduler has no allocator


def test_tiers_non_empty_and_without_duplicates():
    with pytest.raises(ValueError, match="storage/backends is empty"):
        check_config(cfg_with(storage__backends={}), META)
    twice = {"local_cpu": {"_target_": "lmcache.storage.backends.local_cpu.LocalCPUBackend"},
             "again": {"_target_": "lmcache.storage.backends.local_cpu.LocalCPUBackend"}}
    with pytest.raises(ValueError, match="LocalCPUBackend twice .*'local_cpu' and 'again'"):
        check_config(cfg_with(storage__backends=twice), META)
    with pytest.raises(ValueError, match="tier 'broken' has no _target_"):
        check_config(cfg_with(storage__backends={"broken": {"x": 1}}), META)


def test_missing_slots_are_named():
    with pytest.raises(ValueError, match="no storage/policy option"):
        check_config(cfg_with(storage__policy=None), META)
    with pytest.raises(ValueError, match="no gpu_connector option"):
        check_config(cfg_with(gpu_connector=None), META)
    with pytest.raises(ValueError, match="no token_database option"):
        check_config(cfg_with(token_database=None), META, role="scheduler")
    with pytest.raises(ValueError, match="role must be"):
        check_config(cfg_with(), META, role="both")


BLEND = {"_target_": "lmcache.blend.cacheblend.CacheBlendBlender"}
SEGMENT = {"_target_": "lmcache.token_database.segment.SegmentTokenDatabase",
           "chunk_size": 16, "save_unfull_chunk": True}
LAYERWISE = {"_target_": "lmcache.gpu_connector.vllm_layerwise.VLLMPagedMemLayerwiseGPUConnector"}


def test_blend_needs_segment_database_and_layerwise_connector():
    with pytest.raises(ValueError) as err:
        check_config(cfg_with(blend=BLEND), META)
    message = str(err.value)
    assert "blend=cacheblend needs token_database=segment" in message
    assert "got token_database=chunked, gpu_connector=vllm_paged" in message
    with pytest.raises(ValueError, match="got token_database=segment, gpu_connector=vllm_paged"):
        check_config(cfg_with(blend=BLEND, token_database=SEGMENT), META)
    with pytest.raises(ValueError, match="needs save_unfull_chunk=true"):
        check_config(cfg_with(blend=BLEND, token_database={**SEGMENT, "save_unfull_chunk": False},
                              gpu_connector=LAYERWISE), META)
    check_config(cfg_with(blend=BLEND, token_database=SEGMENT, gpu_connector=LAYERWISE), META)


def test_option_name():
    assert option_name({"_target_": "a.b.segment.SegmentTokenDatabase"}) == "segment"
    assert option_name(None) is None
    with pytest.raises(ValueError, match="no _target_"):
        option_name({"x": 1})
