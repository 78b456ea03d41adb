"""LMCache configuration (YAML, LMCACHE_* env, vLLM extra config) → Hydra overrides → config."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lmcache.config import compose_config, list_options
from lmcache.config.checks import option_name
from lmcache.config.legacy import FEATURES, HASH_ALGORITHMS, REMOTE_SCHEMES, overrides_from_legacy


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "lmcache.yaml"
    path.write_text(text)
    return str(path)


def test_nothing_set_gives_no_overrides():
    assert overrides_from_legacy(None, {}, {}) == []
    assert overrides_from_legacy("", {"PATH": "/bin", "LMCACHE_CONFIG_FILE": "x.yaml"}, None) == []


def test_yaml_file_translates_to_the_same_graph(tmp_path):
    path = write_yaml(tmp_path, f"""
chunk_size: 512
local_cpu: true
max_local_cpu_size: 2.5
local_disk: "file://{tmp_path}/disk/"
max_local_disk_size: 8
remote_url: "valkey://cache.example:6380"
remote_serde: naive
cache_policy: FIFO
save_unfull_chunk: true
blocking_timeout_secs: 3
""")
    overrides = overrides_from_legacy(path, {}, {})
    assert overrides == [
        "storage/backends=[local_cpu,local_disk,remote]",
        "remote_connector=valkey",
        "serde=naive",
        "storage/policy=fifo",
        f"++local_disk='{tmp_path}/disk/'",
        "++remote_url='valkey://cache.example:6380'",
        "++chunk_size=512",
        "++max_local_cpu_size=2.5",
        "++max_local_disk_size=8.0",
        "++save_unfull_chunk=true",
        "++blocking_timeout_secs=3",
    ]
    cfg = compose_config(overrides)
    assert list(cfg.storage.backends) == ["local_cpu", "local_disk", "remote"]
    assert cfg.storage.backends.local_disk.local_disk == f"{tmp_path}/disk/"
    assert cfg.storage.backends.local_disk.max_local_disk_size == 8.0
    assert cfg.token_database.chunk_size == 512
    assert cfg.token_database.save_unfull_chunk is True
    assert cfg.allocator.size_bytes == int(2.5 * 1024**3)
    assert option_name(cfg.remote_connector) == "valkey"
    assert cfg.remote_connector.url == "valkey://cache.example:6380"
    assert cfg.remote_connector.blocking_timeout_secs == 3
    assert option_name(cfg.storage.policy) == "fifo"
    assert option_name(cfg.serde) == "naive"


def test_precedence_extra_config_over_env_over_yaml(tmp_path):
    path = write_yaml(tmp_path, "chunk_size: 128\nsave_decode_cache: true\n")
    env = {"LMCACHE_CHUNK_SIZE": "256"}
    extra = {"lmcache.chunk_size": 512}
    assert "++chunk_size=128" in overrides_from_legacy(path, {}, {})
    assert "++chunk_size=256" in overrides_from_legacy(path, env, {})
    both = overrides_from_legacy(path, env, extra)
    assert "++chunk_size=512" in both and "++chunk_size=256" not in both
    assert "++save_decode_cache=true" in both  # a key only the YAML sets survives
    assert compose_config(both).token_database.chunk_size == 512


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("1", True), ("True", True), ("TRUE", True), ("no", False),
    ("False", False), ("0", False), ("false", False), ("off", False),
])
def test_env_strings_parse_as_booleans(text, expected):
    overrides = overrides_from_legacy(None, {"LMCACHE_SAVE_UNFULL_CHUNK": text}, {})
    assert overrides == [f"++save_unfull_chunk={'true' if expected else 'false'}"]
    assert compose_config(overrides).token_database.save_unfull_chunk is expected


def test_env_numbers_and_local_disk():
    overrides = overrides_from_legacy(None, {
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.5", "LMCACHE_LOCAL_DISK": "/data/kv",
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "100", "LMCACHE_LOG_LEVEL": "DEBUG",
    }, {})
    assert overrides == ["storage/backends=[local_cpu,local_disk]", "++local_disk='/data/kv'",
                         "++max_local_cpu_size=0.5", "++max_local_disk_size=100.0"]


def test_env_names_of_other_tools_are_skipped_with_a_warning(caplog):
    env = {"LMCACHE_IPC_DIR": "/run/x", "LMCACHE_BENCH_OUTPUT": "out.csv", "LMCACHE_CHUNK_SIZE": "64"}
    with caplog.at_level("WARNING", logger="lmcache.config.legacy"):
        assert overrides_from_legacy(None, env, {}) == ["++chunk_size=64"]
    assert "LMCACHE_BENCH_OUTPUT" in caplog.text and "LMCACHE_IPC_DIR" not in caplog.text


def test_extra_config_only_reads_the_lmcache_prefix(caplog):
    extra = {"lmcache.use_layerwise": False, "lmcache.lookup_timeout_ms": "500",
             "discard_partial_chunks": True, "lmcache_rpc_port": 5}
    with caplog.at_level("WARNING", logger="lmcache.config.legacy"):
        assert overrides_from_legacy(None, {}, extra) == ["++lookup_timeout_ms=500"]
    assert caplog.records == []  # other software's keys pass without a word


@pytest.mark.parametrize(("key", "meant"), [
    ("lmcahce.chunk_size", "lmcache.chunk_size"), ("lmcache_chunk_size", "lmcache.chunk_size"),
    ("LMCache.chunk_size", "lmcache.chunk_size"), ("LMCACHE_CHUNK_SIZE", "lmcache.chunk_size"),
    ("lmcache-local-disk", None), ("lmcach.anything", "lmcache.anything"),
])
def test_misspelled_extra_config_prefix_is_a_warning_naming_key_and_fix(caplog, key, meant):
    with caplog.at_level("WARNING", logger="lmcache.config.legacy"):
        assert overrides_from_legacy(None, {}, {key: 512}) == []
    if meant is None:  # "local-disk" is no LMCache key: nothing to suggest
        assert caplog.records == []
        return
    assert [r.getMessage() for r in caplog.records] == [
        f"ignoring kv_connector_extra_config[{key!r}]: lmcache reads only keys prefixed "
        f"'lmcache.'; did you mean {meant!r}?"]


def test_extra_config_dict_key_error_names_the_key_and_the_source():
    with pytest.raises(ValueError) as err:
        overrides_from_legacy(None, {}, {"lmcache.extra_config": {"a.b": 1}})
    assert str(err.value) == (
        "LMCache config key extra_config={'a.b': 1} (from kv_connector_extra_config"
        "['lmcache.extra_config']): cannot write the dict key 'a.b' as an override "
        "(expected letters, digits, '_' or '-')")


@pytest.mark.parametrize(("url", "shown", "expected"), [
    ("valkey://", "valkey://", "valkey://[user[:password]@]host:port[/db]"),
    ("redis://:pw@:6379/0", "redis://:***@:6379/0", "valkey://[user[:password]@]host:port[/db]"),
    ("valkey-cluster://h1:7000,", "valkey-cluster://h1:7000,",
     "valkey-cluster://[user[:password]@]host1:port1,host2:port2,..."),
    ("lm://:9000", "lm://:9000", "lm://host:port"),
])
def test_remote_url_without_host_is_an_error_naming_it(url, shown, expected):
    with pytest.raises(ValueError) as err:
        overrides_from_legacy(None, {"LMCACHE_REMOTE_URL": url}, {})
    assert str(err.value) == (f"LMCache config key remote_url={shown!r} (from environment "
                              f"variable LMCACHE_REMOTE_URL): the url has no host; expected "
                              f"{expected}")
    with pytest.raises(ValueError, match=r"the url has no directory; expected fs:///path/to/dir"):
        overrides_from_legacy(None, {}, {"lmcache.remote_url": "fs://"})


def test_values_are_taken_literally(tmp_path):
    password = "p${x}a\\b\\"  # p${x}a\b\ : an interpolation and backslashes, end included
    url = f"valkey://user:{password}@cache:6379"
    path = write_yaml(tmp_path, f"local_disk: '{tmp_path}/${{oops}}'\nmax_local_disk_size: 1\n")
    overrides = overrides_from_legacy(path, {"LMCACHE_REMOTE_URL": url},
                                      {"lmcache.extra_config": {"token": password}})
    cfg = OmegaConf.to_container(compose_config(overrides), resolve=True)
    assert cfg["remote_url"] == url and cfg["remote_connector"]["url"] == url
    assert cfg["local_disk"] == f"{tmp_path}/${{oops}}"
    assert cfg["storage"]["backends"]["local_disk"]["local_disk"] == f"{tmp_path}/${{oops}}"
    assert cfg["extra_config"] == {"token": password}


@pytest.mark.parametrize(("source", "key"), [
    ("yaml", "chunk_sise"), ("env", "chunksize"), ("extra", "max_local_cpu")])
def test_unknown_key_is_an_error_naming_it(tmp_path, source, key):
    args = {
        "yaml": (write_yaml(tmp_path, f"{key}: 1\n"), {}, {}),
        "env": (None, {f"LMCACHE_{key.upper()}": "1"}, {}),
        "extra": (None, {}, {f"lmcache.{key}": 1}),
    }[source]
    with pytest.raises(ValueError, match=f"unknown LMCache config key '{key}'") as err:
        overrides_from_legacy(*args)
    assert "did you mean" in str(err.value)
    assert ("chunk_size" if "chunk" in key else "max_local_cpu_size") in str(err.value)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("chunk_size", "abc", "expected an integer"),
    ("chunk_size", "-256", "expected an integer > 0"),
    ("chunk_size", "0", "expected an integer > 0"),
    ("max_local_cpu_size", "-1", "expected a number > 0"),
    ("max_local_disk_size", "-5", "expected a number >= 0"),
    ("local_cpu", "maybe", "expected a boolean"),
    ("extra_config", "{not json", "expected a JSON object"),
    ("cache_policy", "XYZ", "storage/policy option 'xyz'"),
    ("remote_serde", "zfp", "serde option 'zfp'"),
    ("pre_caching_hash_algorithm", "md5", "expected one of " + ", ".join(HASH_ALGORITHMS)),
])
def test_bad_values_name_key_and_value(key, value, expected):
    with pytest.raises(ValueError) as err:
        overrides_from_legacy(None, {f"LMCACHE_{key.upper()}": value}, {})
    message = str(err.value)
    assert f"{key}={value!r}" in message
    assert f"LMCACHE_{key.upper()}" in message
    assert expected in message


def test_bad_yaml_types_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"chunk_size=True .*expected an integer"):
        overrides_from_legacy(write_yaml(tmp_path, "chunk_size: true\n"), {}, {})
    with pytest.raises(ValueError, match="must hold a mapping"):
        overrides_from_legacy(write_yaml(tmp_path, "- a\n- b\n"), {}, {})
    with pytest.raises(FileNotFoundError):
        overrides_from_legacy(str(tmp_path / "missing.yaml"), {}, {})


def test_missing_config_file_names_the_variable_and_the_path(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError) as err:
        overrides_from_legacy(missing, {"LMCACHE_CONFIG_FILE": missing}, {})
    assert str(err.value) == f"LMCACHE_CONFIG_FILE={missing!r}: no such file"
    with pytest.raises(IsADirectoryError) as err:
        overrides_from_legacy(str(tmp_path), {"LMCACHE_CONFIG_FILE": str(tmp_path)}, {})
    assert str(err.value) == (f"LMCACHE_CONFIG_FILE={str(tmp_path)!r} is a directory, expected "
                              "an LMCache YAML file")
    path = write_yaml(tmp_path, "chunk_size: many\n")
    with pytest.raises(ValueError) as err:
        overrides_from_legacy(path, {"LMCACHE_CONFIG_FILE": path}, {})
    assert str(err.value) == (f"LMCache config key chunk_size='many' (from "
                              f"LMCACHE_CONFIG_FILE={path!r}): expected an integer")


def test_local_disk_needs_a_size():
    with pytest.raises(ValueError, match=r"local_disk='/d'.*max_local_disk_size > 0"):
        overrides_from_legacy(None, {"LMCACHE_LOCAL_DISK": "/d"}, {})


def test_local_cpu_false_keeps_cpu_memory_as_the_allocator_only(caplog):
    overrides = overrides_from_legacy(None, {"LMCACHE_LOCAL_CPU": "false",
                                             "LMCACHE_LOCAL_DISK": "/d",
                                             "LMCACHE_MAX_LOCAL_DISK_SIZE": "2"}, {})
    assert overrides == ["storage/backends=[local_cpu,local_disk]", "++local_disk='/d'",
                         "++local_cpu=false", "++max_local_disk_size=2.0"]
    cfg = compose_config(overrides)
    assert cfg.local_cpu is False and cfg.storage.backends.local_cpu.local_cpu is False
    with caplog.at_level("WARNING"):
        assert overrides_from_legacy(None, {"LMCACHE_LOCAL_CPU": "0"}, {}) == ["++local_cpu=false"]
    assert "local_cpu=False (from environment variable LMCACHE_LOCAL_CPU) and no other tier" \
        in caplog.text


@pytest.mark.parametrize("scheme", sorted(REMOTE_SCHEMES))
def test_every_remote_scheme_selects_its_connector_option(scheme):
    url = f"{scheme}://127.0.0.1:6379" if scheme not in ("fs", "blackhole") else f"{scheme}:///tmp/x"
    if scheme.endswith("cluster"):
        url = f"{scheme}://127.0.0.1:7000,127.0.0.1:7001"
    overrides = overrides_from_legacy(None, {}, {"lmcache.remote_url": url})
    option = REMOTE_SCHEMES[scheme]
    assert overrides == ["storage/backends=[local_cpu,remote]", f"remote_connector={option}",
                         f"++remote_url='{url}'"]
    cfg = compose_config(overrides)
    assert option_name(cfg.remote_connector) == option
    assert cfg.remote_url == url
    assert list(cfg.storage.backends) == ["local_cpu", "remote"]


def test_scheme_table_targets_are_installed_options():
    assert set(REMOTE_SCHEMES.values()) <= set(list_options("remote_connector"))


@pytest.mark.parametrize("url", ["s3://bucket/kv", "mooncakestore://h:1", "localhost:6379"])
def test_unknown_remote_scheme_names_it_and_the_known_ones(url):
    with pytest.raises(ValueError) as err:
        overrides_from_legacy(None, {"LMCACHE_REMOTE_URL": url}, {})
    message = str(err.value)
    assert "unknown scheme" in message and repr(url.split("://")[0] if "://" in url else "") in message
    assert "valkey, valkey-cluster, valkeys" in message


@pytest.mark.parametrize("key", sorted(FEATURES))
def test_unavailable_features_are_refused_not_ignored(key):
    assert overrides_from_legacy(None, {f"LMCACHE_{key.upper()}": "false"}, {}) == []
    with pytest.raises(ValueError, match=f"{key}='true'.*not available in lmcache yet"):
        overrides_from_legacy(None, {f"LMCACHE_{key.upper()}": "true"}, {})
    with pytest.raises(ValueError, match=f"{key}=True.*not available in lmcache yet"):
        overrides_from_legacy(None, {}, {f"lmcache.{key}": True})


def test_unsupported_settings_only_at_their_default(tmp_path):
    path = write_yaml(tmp_path, "blend_thresholds: null\nnuma_mode: null\npy_enable_gc: true\n")
    assert overrides_from_legacy(path, {}, {}) == []
    with pytest.raises(ValueError, match=r"blend_thresholds=\[0.5\].*not supported"):
        overrides_from_legacy(write_yaml(tmp_path, "blend_thresholds: [0.5]\n"), {}, {})
    with pytest.raises(ValueError, match=r"maru_path='/dev/shm/m'.*default None"):
        overrides_from_legacy(None, {"LMCACHE_MARU_PATH": "/dev/shm/m"}, {})


def test_deprecated_alias_is_read_under_its_new_name():
    assert overrides_from_legacy(None, {"LMCACHE_ENABLE_XPYD": "False"}, {}) == []
    with pytest.raises(ValueError, match="pd_role=None.*enable_pd needs pd_role"):
        overrides_from_legacy(None, {"LMCACHE_ENABLE_XPYD": "True"}, {})


def test_hash_algorithm_layerwise_and_extra_config():
    overrides = overrides_from_legacy(None, {
        "LMCACHE_PRE_CACHING_HASH_ALGORITHM": "builtin",
        "LMCACHE_EXTRA_CONFIG": '{"note": "it\'s here", "level": 2}',
    }, {})
    assert overrides == ["++hash_algorithm=builtin",
                         "++extra_config={note:'it\\'s here',level:2}"]
    cfg = compose_config(overrides)
    assert cfg.token_database.hash_algorithm == "builtin"
    assert OmegaConf.to_container(cfg.extra_config) == {"note": "it's here", "level": 2}
    if "vllm_layerwise" in list_options("gpu_connector"):
        assert overrides_from_legacy(None, {"LMCACHE_USE_LAYERWISE": "1"}, {}) == [
            "gpu_connector=vllm_layerwise"]
    else:
        with pytest.raises(ValueError, match="gpu_connector option 'vllm_layerwise'"):
            overrides_from_legacy(None, {"LMCACHE_USE_LAYERWISE": "1"}, {})
