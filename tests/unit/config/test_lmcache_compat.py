"""What LMCache 0.5.6 accepts, lmcache accepts with the same meaning: old keys LMCache ignores
(warned), quoted LMCACHE_* values, enable_async_loading, and local_cpu: false (CPU memory is
then only the staging allocator, not a cache tier)."""

from __future__ import annotations

import logging

import pytest
import torch

from lmcache.config import compose_config
from lmcache.config.legacy import IGNORED_OLD_KEYS, legacy_overrides, overrides_from_legacy
from lmcache.containers import build_worker_container, shutdown
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.keys import CacheEngineKey
from lmcache.metadata import LMCacheMetadata

META = LMCacheMetadata("org/model", 1, 0, torch.float32, (2, 2, 16, 2, 8))
LAYOUT = KVCacheLayout("cpu_packed", block_size=16, num_kv_heads=2, head_size=8)
SHAPE = (2, 2, 16, 16)  # KV_2LTD chunk: [2, layers, tokens, heads*head_size]


@pytest.mark.parametrize("key", sorted(IGNORED_OLD_KEYS))
def test_old_keys_lmcache_ignores_are_ignored_with_a_warning(tmp_path, caplog, key):
    path = tmp_path / "old.yaml"
    path.write_text(f"chunk_size: 128\n{key}: 'cpu'\n")
    with caplog.at_level(logging.WARNING, logger="lmcache.config.legacy"):
        assert overrides_from_legacy(str(path), {}, {}) == ["++chunk_size=128"]
    assert (f"ignoring LMCache config key {key} (from LMCache config file {str(path)!r}): "
            f"LMCache 0.5.6 no longer reads it either ({IGNORED_OLD_KEYS[key]})") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmcache.config.legacy"):
        assert overrides_from_legacy(None, {}, {f"lmcache.{key}": "cpu"}) == []
    assert f"ignoring LMCache config key {key} (from kv_connector_extra_config" in caplog.text


def test_typos_of_known_keys_stay_errors_with_did_you_mean(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("local_devise: cpu\n")
    with pytest.raises(ValueError, match=r"unknown LMCache config key 'local_devise' .*"
                                         r"did you mean 'local_disk'"):
        overrides_from_legacy(str(path), {}, {})
    with pytest.raises(ValueError, match="did you mean 'chunk_size'"):
        overrides_from_legacy(None, {}, {"lmcache.chunk_sise": 512})


@pytest.mark.parametrize(("raw", "expected"), [
    ("'512'", "++chunk_size=512"), ('"512"', "++chunk_size=512"), (" 512 ", "++chunk_size=512")])
def test_quoted_env_values_lose_their_quotes_as_in_lmcache(raw, expected):
    assert overrides_from_legacy(None, {"LMCACHE_CHUNK_SIZE": raw}, {}) == [expected]


def test_quoted_env_strings_and_booleans():
    overrides = overrides_from_legacy(None, {"LMCACHE_LOCAL_DISK": '"/nvme/kv cache"',
                                             "LMCACHE_MAX_LOCAL_DISK_SIZE": "'2.5'",
                                             "LMCACHE_SAVE_UNFULL_CHUNK": '"true"',
                                             "LMCACHE_REMOTE_URL": "'valkey://h:6379'"}, {})
    assert overrides == ["storage/backends=[local_cpu,local_disk,remote]",
                         "remote_connector=valkey", "++local_disk='/nvme/kv cache'",
                         "++remote_url='valkey://h:6379'", "++max_local_disk_size=2.5",
                         "++save_unfull_chunk=true"]
    # a quoted string with an escape is read as LMCache reads it (a Python literal)
    assert overrides_from_legacy(None, {"LMCACHE_LOCAL_DISK": r"'/kv\\x'",
                                        "LMCACHE_MAX_LOCAL_DISK_SIZE": "1"}, {})[1] \
        == r"++local_disk='/kv\x'"
    # YAML values keep their quotes' meaning (YAML strips them itself)
    assert overrides_from_legacy(None, {}, {"lmcache.chunk_size": "512"}) == ["++chunk_size=512"]


@pytest.mark.parametrize("word", ["yes", "on", "Y", "t"])
def test_env_booleans_lmcache_reads_as_false_are_refused_not_flipped(word):
    # LMCache 0.5.6's _to_bool: only "true"/"1" are true; "yes" would be false there
    with pytest.raises(ValueError) as err:
        overrides_from_legacy(None, {"LMCACHE_SAVE_UNFULL_CHUNK": word}, {})
    assert str(err.value) == (
        f"LMCache config key save_unfull_chunk={word!r} (from environment variable "
        f"LMCACHE_SAVE_UNFULL_CHUNK): LMCache 0.5.6 reads {word!r} as false (only true/1 are "
        "true); write true or false")


def test_enable_async_loading_is_accepted(caplog):
    with caplog.at_level(logging.INFO, logger="lmcache.config.legacy"):
        assert overrides_from_legacy(None, {"LMCACHE_ENABLE_ASYNC_LOADING": "True"}, {}) == []
    assert "enable_async_loading=True (from environment variable LMCACHE_ENABLE_ASYNC_LOADING)" \
        in caplog.text
    assert overrides_from_legacy(None, {}, {"lmcache.enable_async_loading": False}) == []
    with pytest.raises(ValueError, match="enable_async_loading='maybe'.*expected a boolean"):
        overrides_from_legacy(None, {"LMCACHE_ENABLE_ASYNC_LOADING": "maybe"}, {})


def test_internal_api_server_keys_are_translated():
    overrides = overrides_from_legacy(None, {"LMCACHE_INTERNAL_API_SERVER_ENABLED": "true",
                                             "LMCACHE_INTERNAL_API_SERVER_HOST": "'0.0.0.0'",
                                             "LMCACHE_INTERNAL_API_SERVER_PORT_START": "7100"}, {})
    assert overrides == ["++internal_api_server_enabled=true",
                         "++internal_api_server_host='0.0.0.0'",
                         "++internal_api_server_port_start=7100"]
    cfg = compose_config(overrides)
    assert (cfg.internal_api_server_enabled, cfg.internal_api_server_host,
            cfg.internal_api_server_port_start) == (True, "0.0.0.0", 7100)
    with pytest.raises(ValueError, match="internal_api_server_include_index_list=.*configures "
                                         "LMCache's internal API server"):
        overrides_from_legacy(None, {}, {"lmcache.internal_api_server_include_index_list": [0]})


@pytest.mark.parametrize(("key", "value", "feature"), [
    ("pd_bidirectional", "true", "disaggregated prefill (PD)'s bidirectional mode"),
    ("pd_backend_mode", "sync", "disaggregated prefill (PD)'s backend modes"),
    ("lmcache_worker_ids", "0,1", "the cache controller"),
    ("blend_thresholds", "0.5", "CacheBlend's threshold selection"),
    ("gds_path", "/mnt/gds", "GPUDirect Storage (GDS)"),
])
def test_settings_of_missing_features_name_the_feature(key, value, feature):
    with pytest.raises(ValueError) as err:
        overrides_from_legacy(None, {f"LMCACHE_{key.upper()}": value}, {})
    message = str(err.value)
    assert f"configures {feature}, which is not supported by lmcache yet" in message
    assert f"environment variable LMCACHE_{key.upper()}" in message


def test_old_env_prefix_is_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lmcache.config.legacy"):
        assert overrides_from_legacy(None, {"LM_CACHE_CHUNK_SIZE": "512",
                                            "LM_CACHE_WHATEVER": "1"}, {}) == []
    assert ("ignoring environment variable LM_CACHE_CHUNK_SIZE: lmcache, like LMCache, reads "
            "LMCACHE_<KEY> variables; did you mean LMCACHE_CHUNK_SIZE?") in caplog.text
    assert ("ignoring environment variable LM_CACHE_WHATEVER: lmcache, like LMCache, reads "
            "LMCACHE_<KEY> variables\n") in caplog.text + "\n"


def test_legacy_overrides_name_the_source_of_each_override(tmp_path):
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_size: 128\nlocal_disk: /kv\nmax_local_disk_size: 1\n")
    pairs = legacy_overrides(str(path), {"LMCACHE_CHUNK_SIZE": "64"},
                             {"lmcache.remote_url": "valkey://h:1"})
    file = f"LMCache config file {str(path)!r}"
    assert pairs == [
        ("storage/backends=[local_cpu,local_disk,remote]",
         f"{file}; kv_connector_extra_config['lmcache.remote_url']"),
        ("remote_connector=valkey", "kv_connector_extra_config['lmcache.remote_url']"),
        ("++local_disk='/kv'", file),
        ("++remote_url='valkey://h:1'", "kv_connector_extra_config['lmcache.remote_url']"),
        ("++chunk_size=64", "environment variable LMCACHE_CHUNK_SIZE"),
        ("++max_local_disk_size=1.0", file),
    ]


def _key(i: int) -> CacheEngineKey:
    return CacheEngineKey("org/model", 1, 0, 1000 + i, torch.float32)


def _store_and_read_back(tmp_path, local_cpu: bool):
    """Store 3 chunks through a real worker graph (CPU + disk tier), read them back by
    retrieve and by lookup-prefetch; returns what each tier held and what came back."""
    overrides = overrides_from_legacy(None, {"LMCACHE_LOCAL_CPU": str(local_cpu).lower(),
                                             "LMCACHE_CHUNK_SIZE": "16",
                                             "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.01",
                                             "LMCACHE_LOCAL_DISK": str(tmp_path),
                                             "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.01"}, {})
    container = build_worker_container(compose_config(overrides), META, LAYOUT)
    try:
        manager = container.storage_manager()
        cpu, disk = container.backends()
        keys = [_key(i) for i in range(3)]
        objs = []
        for i in range(3):
            obj = manager.allocate(SHAPE, torch.float32)
            obj.tensor.copy_(torch.full(SHAPE, float(i + 1)))
            objs.append(obj)
        manager.batched_put(keys, objs)
        assert disk.flush(10)
        held_after_store = len(cpu)
        got = manager.batched_get(keys)
        values = [float(o.tensor[0, 0, 0, 0]) for o in got]
        for o in got:
            o.ref_count_down()
        held_after_get = len(cpu)
        hits = manager.contains_prefix(keys, pin=True, lookup_id="r1")
        got = manager.batched_get(keys, lookup_id="r1")
        prefetched = [float(o.tensor[0, 0, 0, 0]) for o in got if o is not None]
        for o in got:
            if o is not None:
                o.ref_count_down()
        manager.unpin(keys)
        held_after_prefetch = len(cpu)
        used = container.allocator().used_bytes
        return dict(cpu_is_allocator=manager.allocator_backend is cpu,
                    held=(held_after_store, held_after_get, held_after_prefetch),
                    values=values, hits=hits, prefetched=prefetched,
                    disk_holds=sum(disk.contains(k) for k in keys), allocator_used=used)
    finally:
        shutdown(container)


def test_local_cpu_false_keeps_nothing_in_cpu_memory_and_serves_from_disk(tmp_path):
    off = _store_and_read_back(tmp_path / "off", local_cpu=False)
    assert off == dict(cpu_is_allocator=True, held=(0, 0, 0), values=[1.0, 2.0, 3.0], hits=3,
                       prefetched=[1.0, 2.0, 3.0], disk_holds=3, allocator_used=0)
    # the same graph with the CPU tier on keeps the chunks in CPU memory
    on = _store_and_read_back(tmp_path / "on", local_cpu=True)
    assert on["held"] == (3, 3, 3) and on["values"] == [1.0, 2.0, 3.0] and on["hits"] == 3
    assert on["allocator_used"] > 0


def test_local_cpu_false_backend_serves_nothing_but_allocates():
    from lmcache.memory.cpu import CPUMemoryAllocator
    from lmcache.storage.backends.local_cpu import LocalCPUBackend
    from lmcache.storage.policy.lru import LRUCachePolicy

    allocator = CPUMemoryAllocator(1 << 20, pin_memory=False)
    backend = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=1 / 1024,
                              local_cpu=False)
    try:
        obj = backend.allocate(SHAPE, torch.float32)
        assert obj is not None and allocator.used_bytes > 0
        backend.put(_key(0), obj)
        assert (len(backend), backend.contains(_key(0)), backend.get_blocking(_key(0))) \
            == (0, False, None)
        assert backend.num_rejected_puts == 0 and obj.get_ref_count() == 1
        obj.ref_count_down()
        assert allocator.used_bytes == 0
        with pytest.raises(ValueError, match="local_cpu must be a bool, got 'no'"):
            LocalCPUBackend(allocator, LRUCachePolicy(), local_cpu="no")
    finally:
        allocator.close()
