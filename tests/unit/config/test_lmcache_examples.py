"""LMCache's own example configs (tests/unit/config/lmcache_examples/, copied from LMCache's
repository): each one starts (translates, composes and passes the config checks), or is
refused only for a feature lmcache does not have yet, named in the error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from lmcache.config import compose_config, list_options
from lmcache.config.checks import check_config, machine_memory, option_name
from lmcache.config.legacy import overrides_from_legacy

EXAMPLES = Path(__file__).parent / "lmcache_examples"

# file → the missing feature its refusal must name (None: it must start)
EXPECTED = {
    "examples__example.yaml": None,
    "examples__cache_by_tags__example.yaml": None,
    "examples__caching_switch__example.yaml": None,
    "examples__disk_offline_inference__example.yaml": None,
    "examples__save_decode_cache__example.yaml": None,
    "examples__storage_backends__disk_local.yaml": None,
    "examples__sgl_integration__lmcache_config.yaml": None,
    "examples__lmc_connector__example.yaml": None,
    "examples__docker__example.yaml": None,
    "examples__kv_cache_reuse__share_across_instances__centralized_sharing__example.yaml": None,
    "examples__storage_backends__cpu_redis.yaml": None,
    "examples__blend_kv_v1__blending.yaml": None,
    # no controller_reply_url: LMCache 0.5.6 refuses it too ("controller_reply_url is required")
    "examples__cache_controller__example.yaml": "needs controller_reply_url",
    "examples__kv_cache_reuse__share_across_instances__p2p_sharing__example1.yaml": None,
    # LMCache's old NIXL-era decoder keys (nixl_buffer_device) and a GPU PD buffer
    "examples__disagg_prefill__1p1d__configs__lmcache-decoder-config.yaml": "configures NIXL",
    "examples__disagg_prefill__1p1d__configs__lmcache-prefiller-config.yaml":
        "PD buffer is the CPU allocator",
    "examples__kv_cache_reuse__remote_backends__resp__resp.yaml": "unknown scheme 'resp'",
    "examples__kv_cache_reuse__remote_backends__s3__example.yaml": "unknown scheme 's3'",
}


def test_every_stored_example_has_an_expectation_and_a_readme_line():
    files = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert files == sorted(EXPECTED)
    readme = (EXAMPLES / "README.md").read_text()
    for name in files:
        assert f"`{name}` ← `{name.replace('__', '/')}`" in readme


def _fits_memory(path: Path) -> bool:
    size = (yaml.safe_load(path.read_text()) or {}).get("max_local_cpu_size", 5.0)
    total, _, _ = machine_memory()
    return total is None or size * 1024**3 <= total


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_lmcache_example_starts_or_names_the_missing_feature(name, caplog):
    path = EXAMPLES / name
    feature = EXPECTED[name]
    if feature is None and not _fits_memory(path):
        pytest.skip(f"{name} asks for more CPU memory than this machine has")
    with caplog.at_level(logging.WARNING):
        if feature is not None:
            with pytest.raises(ValueError) as err:
                cfg = compose_config(overrides_from_legacy(str(path), {}, {}))
                check_config(cfg)
            assert feature in str(err.value)
            assert f"LMCache config file {str(path)!r}" in str(err.value)
            return
        cfg = compose_config(overrides_from_legacy(str(path), {}, {}))
        check_config(cfg)
    data = yaml.safe_load(path.read_text())
    assert cfg.chunk_size == data.get("chunk_size", 256)
    assert cfg.local_cpu == data.get("local_cpu", True)
    assert cfg.save_decode_cache == data.get("save_decode_cache", False)
    tiers = list(cfg.storage.backends)
    if "remote_url" in data:
        assert tiers == ["local_cpu", "remote"] and cfg.remote_url == data["remote_url"]
        assert option_name(cfg.serde) == data.get("remote_serde", "naive")
    elif data.get("enable_p2p"):  # the P2P tier, the controller's worker, the channel
        assert tiers == ["local_cpu", "p2p"] and option_name(cfg.controller) == "lmcache_worker"
        assert option_name(cfg.transfer_channel) == data["transfer_channel"]
        assert (cfg.lmcache_instance_id, cfg.controller_reply_url, cfg.p2p_lookup_ports) == (
            data["lmcache_instance_id"], data["controller_reply_url"], [data["p2p_lookup_ports"]])
    else:
        assert tiers == ["local_cpu"]
    if data.get("enable_blending"):  # CacheBlend's own layerwise connector
        assert (option_name(cfg.blend), option_name(cfg.gpu_connector)) == (
            "cacheblend", "vllm_buffer_layerwise")
        assert cfg.token_database.blend_special_str == data["blend_special_str"]
    elif data.get("use_layerwise"):
        assert option_name(cfg.gpu_connector) == "vllm_layerwise"
    if "local_device" in data:  # ignored, as LMCache 0.5.6 ignores it, with a warning
        assert "ignoring LMCache config key local_device" in caplog.text


def test_examples_outcome_table():
    """8.5's count: how many of LMCache's examples start, and why the others are refused."""
    started = [n for n, f in EXPECTED.items() if f is None]
    assert len(EXPECTED) == 18 and len(started) == 13
    assert "cachegen" in list_options("serde")  # three examples use remote_serde: cachegen
