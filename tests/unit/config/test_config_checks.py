"""Cross-group invariants, checked before the graph is built."""

from __future__ import annotations

import importlib.resources
import os

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from lmcache.config import compose_config
from lmcache.config.checks import (TOP_LEVEL_KEYS, check_config, check_directory, check_values,
                                   chunk_bytes, option_name)
from lmcache.config.overrides import override_value
from lmcache.token_database.hashing import HASH_ALGORITHMS
from lmcache.containers import build_scheduler_container, build_worker_container
from lmcache.gpu_connector.kv_layout import KVCacheLayout
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
    with pytest.raises(ValueError) as err:
        check_config(cfg_with(f"chunk_size={value}"), None)
    assert str(err.value) == f"config key chunk_size={value}: expected an integer > 0"
    with pytest.raises(ValueError, match=f"chunk_size must be an integer > 0, got {value}"):
        check_config(cfg_with(token_database__chunk_size=value), None)  # the option's own key


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


def test_every_top_level_key_of_config_yaml_has_a_parser():
    text = (importlib.resources.files("lmcache.conf") / "config.yaml").read_text()
    keys = set(yaml.safe_load(text)) - {"defaults"}
    assert keys == set(TOP_LEVEL_KEYS) - {"extra_config"}
    check_values(compose_config())  # the defaults pass


# (override, exact message): each is a value Hydra composes without complaint
BAD_VALUES = [
    ("save_unfull_chunk=maybe",
     "config key save_unfull_chunk='maybe': expected a boolean (true/false), got str 'maybe'; "
     "a quoted command-line value is a string: write it unquoted"),
    ("save_unfull_chunk='false'",
     "config key save_unfull_chunk='false': expected a boolean (true/false), got str 'false'; "
     "a quoted command-line value is a string: write it unquoted"),
    ("save_decode_cache=1",
     "config key save_decode_cache=1: expected a boolean (true/false), got int 1"),
    ("max_local_cpu_size='1'",
     "config key max_local_cpu_size='1': expected a number, got str '1'; a quoted "
     "command-line value is a string: write it unquoted"),
    ("max_local_cpu_size=abc",  # checked before the allocator's size_bytes resolver runs
     "config key max_local_cpu_size='abc': expected a number, got str 'abc'; a quoted "
     "command-line value is a string: write it unquoted"),
    ("max_local_cpu_size=0", "config key max_local_cpu_size=0: expected a number > 0"),
    ("blocking_timeout_secs=abc",
     "config key blocking_timeout_secs='abc': expected a number, got str 'abc'; a quoted "
     "command-line value is a string: write it unquoted"),
    ("blocking_timeout_secs=0", "config key blocking_timeout_secs=0: expected a number > 0"),
    ("max_local_disk_size=abc",
     "config key max_local_disk_size='abc': expected a number, got str 'abc'; a quoted "
     "command-line value is a string: write it unquoted"),
    ("max_local_disk_size=-1", "config key max_local_disk_size=-1: expected a number >= 0"),
    ("hash_seed=123",
     "config key hash_seed=123: expected a string or null, got the integer 123; quote it "
     "('123'): vLLM and LMCache seed the hash chain with a string"),
    ("lookup_timeout_ms=-5", "config key lookup_timeout_ms=-5: expected an integer > 0"),
    ("lookup_timeout_ms=2.5",
     "config key lookup_timeout_ms=2.5: expected an integer, got float 2.5"),
    ("chunk_size=1.5", "config key chunk_size=1.5: expected an integer, got float 1.5"),
    ("chunk_size=true", "config key chunk_size=True: expected an integer, got bool True"),
    ("hash_algorithm=md5",
     "config key hash_algorithm='md5': expected one of " + ", ".join(sorted(HASH_ALGORITHMS))),
    ("local_disk=5", "config key local_disk=5: expected a string or null, got int 5"),
    ("remote_url=valkey://",
     "config key remote_url='valkey://': the url has no host; expected "
     "valkey://[user[:password]@]host:port[/db]"),
    ("remote_url='s3://me:secret@bucket'",
     "config key remote_url='s3://me:***@bucket': unknown scheme 's3'; known schemes: "
     "blackhole, fs, lm, redis, redis-cluster, rediss, valkey, valkey-cluster, valkeys"),
    ("++extra_config=[1]", "config key extra_config=[1]: expected a mapping or null, got list [1]"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_top_level_values_name_key_value_and_expectation(override, message):
    cfg = compose_config([override])
    for role in ("scheduler", "worker"):
        with pytest.raises(ValueError) as err:
            check_config(cfg, None, role=role)
        assert str(err.value) == message


def test_container_checks_values_before_resolving_the_options_that_use_them():
    layout = KVCacheLayout("cpu_packed", block_size=16, num_kv_heads=2, head_size=64)
    cfg = compose_config(["chunk_size=16", "max_local_cpu_size=abc"])  # size_bytes cannot resolve
    with pytest.raises(ValueError, match=r"^config key max_local_cpu_size='abc': expected a "
                                         r"number, got str 'abc'"):
        build_worker_container(cfg, META, layout)
    with pytest.raises(ValueError, match=r"^config key hash_seed=7: expected a string or null"):
        build_scheduler_container(compose_config(["chunk_size=16", "hash_seed=7"]), META)


def test_good_values_of_every_accepted_type_pass(tmp_path):
    check_config(cfg_with("hash_seed='123'", "blocking_timeout_secs=0.5", "max_local_cpu_size=1",
                          "save_unfull_chunk=true", "hash_algorithm=builtin", "lookup_timeout_ms=1",
                          "max_local_disk_size=0", f"local_disk={tmp_path}",
                          "remote_url='valkey://u:p@h:1/0'", "++extra_config={a:1}"), META)


def test_an_unresolvable_value_is_named_by_its_key():
    cfg = compose_config(["local_disk=/tmp/${oops}"])  # the command line's own interpolation
    with pytest.raises(ValueError, match=r"^config key local_disk cannot be resolved: "
                                         r"Interpolation key 'oops' not found"):
        check_config(cfg, None, role="scheduler")


TIER_ORDER_CASES = [
    ("storage/backends=[remote,local_cpu]", "[remote,local_cpu]", "[local_cpu,remote]"),
    ("storage/backends=[local_disk,local_cpu]", "[local_disk,local_cpu]", "[local_cpu,local_disk]"),
    ("storage/backends=[local_disk]", "[local_disk]", "[local_cpu,local_disk]"),
]


@pytest.mark.parametrize(("override", "given", "fixed"), TIER_ORDER_CASES,
                         ids=[c[1] for c in TIER_ORDER_CASES])
def test_local_cpu_must_be_present_and_first(override, given, fixed, tmp_path):
    cfg = cfg_with(override, "remote_connector=blackhole", f"local_disk={tmp_path}",
                   "max_local_disk_size=1")
    message = (f"storage/backends={given}: local_cpu must be present and the first tier (the "
               "CPU tier is the allocator backend every other tier stages its chunks through); "
               f"e.g. storage/backends={fixed}")
    with pytest.raises(ValueError) as err:
        check_config(cfg, META)
    assert str(err.value) == message
    layout = KVCacheLayout("cpu_packed", block_size=16, num_kv_heads=2, head_size=64)
    with pytest.raises(ValueError) as err:  # refused when the container is made, before a build
        build_worker_container(cfg, META, layout)
    assert str(err.value) == message
    assert os.listdir(tmp_path) == []


def test_remote_tier_needs_a_matching_remote_connector():
    with pytest.raises(ValueError, match="^storage/backends has remote but no remote_connector "
                                         "is selected: e.g. remote_connector=valkey"):
        check_config(cfg_with("storage/backends=[local_cpu,remote]"), META)
    cfg = cfg_with("storage/backends=[local_cpu,remote]", "remote_connector=valkey",
                   "remote_url=lm://127.0.0.1:65000")
    with pytest.raises(ValueError) as err:
        check_config(cfg, META)
    assert str(err.value) == ("remote_connector=valkey cannot serve the url "
                              "'lm://127.0.0.1:65000', whose scheme needs remote_connector=lm")
    check_config(cfg_with("storage/backends=[local_cpu,remote]", "remote_connector=blackhole"),
                 META)


def _unwritable_dir(tmp_path) -> str:
    """A directory no file can be created in: mode 0555 (not enough for root), else /sys."""
    path = tmp_path / "read_only"
    path.mkdir()
    path.chmod(0o555)
    try:
        (path / "probe").touch()
    except OSError:
        return str(path)
    (path / "probe").unlink()
    return "/sys"  # root writes through 0555; sysfs refuses new files even to root


def test_local_disk_must_be_a_writable_directory(tmp_path):
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    cases = [
        (str(a_file), f"local_disk={str(a_file)!r} is a file, expected a directory"),
        (str(a_file / "kv"), f"local_disk={str(a_file / 'kv')!r} cannot be created: "
                             f"{str(a_file)!r} is a file, expected a directory"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError) as err:
            check_config(cfg_with("storage/backends=[local_cpu,local_disk]",
                                  "local_disk=" + override_value(path), "max_local_disk_size=1"),
                         META)
        assert str(err.value) == message
    read_only = _unwritable_dir(tmp_path)
    with pytest.raises(ValueError, match=rf"^local_disk='{read_only}' is not writable \(.+\); "
                                         "the local_disk tier writes one file per chunk there$"):
        check_directory(read_only)
    with pytest.raises(ValueError, match=rf"^local_disk='{read_only}/kv' cannot be created in "
                                         rf"'{read_only}' \(.+\)"):
        check_config(cfg_with("storage/backends=[local_cpu,local_disk]",
                              f"local_disk={read_only}/kv", "max_local_disk_size=1"), META)
    missing = tmp_path / "new" / "kv"  # creatable: passes, and the check creates nothing
    check_config(cfg_with("storage/backends=[local_cpu,local_disk]",
                          "local_disk=file://" + str(missing), "max_local_disk_size=1"), META)
    assert sorted(os.listdir(tmp_path)) == sorted(["passwd", "read_only"])


def test_disk_tier_needs_a_directory_and_a_capacity(tmp_path):
    with pytest.raises(ValueError, match=r"^storage/backends has local_disk but local_disk=None: "
                                         "give the tier's directory"):
        check_config(cfg_with("storage/backends=[local_cpu,local_disk]"), META)
    with pytest.raises(ValueError, match=r"^storage/backends has local_disk but "
                                         r"max_local_disk_size=0.0 GiB: give the tier's capacity"):
        check_config(cfg_with("storage/backends=[local_cpu,local_disk]", f"local_disk={tmp_path}"),
                     META)


def test_gpu_allocator_serves_the_cpu_and_p2p_tiers_only():
    check_config(cfg_with("allocator=gpu"), META)  # composes and passes: nothing is built
    check_config(cfg_with("allocator=gpu", "transfer_channel=cuda_ipc", "deployment=p2p"), META)
    with pytest.raises(ValueError, match=r"allocator=gpu .* \['local_disk'\]: use allocator=cpu"):
        check_config(cfg_with("allocator=gpu", "storage/backends=[local_cpu,local_disk]",
                              "local_disk=/tmp/x", "max_local_disk_size=1"), META)


@pytest.mark.parametrize("key,value", [("controller_reply_url", "nohost"),
                                       ("controller_reply_url", "localhost:99999"),
                                       ("controller_pull_url", "localhost:")])
def test_bad_controller_url_is_a_config_error(key, value):
    """A bad controller URL is refused by the config check (before an engine starts), naming
    the key and the value; it used to surface only when the p2p tier was built."""
    check_config(cfg_with("deployment=p2p"), META)  # the deployment's own URLs pass
    with pytest.raises(ValueError, match=rf"{key} must be 'host:port'.*{value!r}"):
        check_config(cfg_with("deployment=p2p", f"{key}='{value}'"), META)
