"""The vLLM integration's config: LMCache keys plus lmcache's own Hydra overrides."""

import pytest

from lmcache.integration.vllm.engine_builder import compose_from_vllm


def test_native_overrides_select_a_deployment_and_win_over_lmcache_keys(tmp_path):
    cfg = compose_from_vllm({"lmcache.chunk_size": 64, "lmcache.max_local_cpu_size": 2.0,
                             "lmcache.overrides": ["deployment=cpu_disk", f"local_disk={tmp_path}",
                                                   "max_local_cpu_size=1.5"]})
    assert cfg.chunk_size == 64
    assert list(cfg.storage.backends) == ["local_cpu", "local_disk"]
    assert cfg.local_disk == str(tmp_path) and cfg.max_local_cpu_size == 1.5


def test_a_single_override_string_is_accepted():
    assert compose_from_vllm({"lmcache.overrides": "chunk_size=32"}).chunk_size == 32


@pytest.mark.parametrize("bad", [[1], {"a": 1}, ["chunk_size=32", None]])
def test_bad_overrides_are_named(bad):
    with pytest.raises(ValueError, match="lmcache.overrides must be a list of Hydra override strings"):
        compose_from_vllm({"lmcache.overrides": bad})
