"""Issue 7.4: the file-name limits of the tiers with one file per chunk (local disk, ``fs://``)
are checked at start against the real file system (``os.pathconf`` NAME_MAX / PATH_MAX): a
configuration whose chunk files could not be created is refused, naming the directory, the
length and the limit, instead of failing every write."""

from __future__ import annotations

import os

import pytest
import torch

from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.keys import LayerCacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata
from lmcache.storage import name_limits
from lmcache.storage.backends import disk_files
from lmcache.storage.backends.disk_names import key_to_filename
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.connectors import fs
from lmcache.storage.policy.lru import LRUCachePolicy

def meta(model: str = "org/model", layers: int = 4) -> LMCacheMetadata:
    return LMCacheMetadata(model, 2, 1, torch.bfloat16, (layers, 2, 16, 4, 16))


@pytest.fixture
def cpu(make_cpu_backend):
    return make_cpu_backend(1)


def disk(cpu, path, metadata) -> LocalDiskBackend:
    return LocalDiskBackend(cpu, LRUCachePolicy(), local_disk=str(path), max_local_disk_size=0.01,
                            metadata=metadata)


def deep_dir(base, free: int) -> str:
    """A directory path (components of 100 bytes, the last one 150 to 250) exactly ``free``
    bytes shorter than the file system's PATH_MAX."""
    _, path_max = name_limits.limits(str(base))
    path = os.path.abspath(str(base))
    while len(path) + 101 < path_max - free - 150:
        path = os.path.join(path, "d" * 100)
    return os.path.join(path, "e" * (path_max - free - len(path) - 1))


def test_longest_keys_are_the_longest_strings_the_worker_writes():
    whole, layer = name_limits.longest_keys(meta(layers=40))
    assert whole == "org/model@2@1@-" + "f" * 64 + "@bfloat16"
    assert layer == whole + "@39"


def test_disk_tier_with_a_model_name_too_long_for_name_max_is_refused(cpu, tmp_path):
    model = "org/" + "m" * 200  # key: 200 + 84 bytes, file name even longer
    where = tmp_path / "kv"
    with pytest.raises(ValueError) as err:
        disk(cpu, where, meta(model))
    msg = str(err.value)
    assert f"local_disk '{where}/rank1of2'" in msg and "NAME_MAX" in msg
    assert "255 bytes per name" in msg and model in msg and "--served-model-name" in msg
    assert not where.exists()  # refused before anything was created


def test_disk_tier_in_a_directory_too_deep_for_path_max_is_refused(cpu, tmp_path):
    name_max, path_max = name_limits.limits(str(tmp_path))
    assert (name_max, path_max) == (255, 4096)  # Linux
    metadata = meta()
    name = key_to_filename(name_limits.longest_keys(metadata)[1], disk_files.SUFFIX)
    where = deep_dir(tmp_path, free=len(name) + 5)  # room for "/rank1of2" but not the name
    with pytest.raises(ValueError) as err:
        disk(cpu, where, metadata)
    path = os.path.join(where, "rank1of2", name)
    assert str(err.value).startswith(
        f"local_disk '{where}/rank1of2': chunk file paths of this configuration are up to "
        f"{len(path)} bytes (the directory, '/', a {len(name)}-byte name), but its file "
        f"system allows paths below 4096 bytes (PATH_MAX)")
    # One directory level up there is room: the tier starts, and its files work.
    ok = disk(cpu, os.path.dirname(where), metadata)
    try:
        obj = cpu.allocate((2, 4, 16, 64), torch.bfloat16, MemoryFormat.KV_2LTD)
        obj.tensor.fill_(3.0)
        key = LayerCacheEngineKey("org/model", 2, 1, name_limits.LONGEST_HASH, torch.bfloat16,
                                  layer_id=3)
        ok.put(key, obj)
        obj.ref_count_down()
        assert ok.flush(timeout=30) and ok.stats["write_errors"] == 0
        got = ok.get_blocking(key)
        assert got is not None and bool((got.tensor == 3.0).all())
        got.ref_count_down()
    finally:
        ok.close()


def test_fs_connector_with_a_model_name_too_long_is_refused(tmp_path):
    model = "org/" + "m" * 200
    with pytest.raises(ValueError) as err:
        fs.FSConnector(f"fs://{tmp_path}/a,{tmp_path}/b", metadata=meta(model))
    msg = str(err.value)
    assert f"remote_url fs:// '{tmp_path}/a'" in msg and "255 bytes per name (NAME_MAX)" in msg
    assert fs.FSConnector(f"fs://{tmp_path}/a", metadata=meta()).paths == [f"{tmp_path}/a"]


def test_fs_connector_in_a_directory_too_deep_for_path_max_is_refused(tmp_path):
    metadata = meta()
    name = fs.file_name(name_limits.longest_keys(metadata)[1])
    where = deep_dir(tmp_path, free=len(name))
    with pytest.raises(ValueError) as err:
        fs.FSConnector(f"fs://{where}", metadata=metadata)
    assert str(err.value).startswith(
        f"remote_url fs:// '{where}': chunk file paths of this configuration are up to "
        f"{len(where) + 1 + len(name)} bytes")
    assert "PATH_MAX" in str(err.value) and "shorter path" in str(err.value)
    fs.FSConnector(f"fs://{os.path.dirname(where)}", metadata=metadata).close()  # room there


def test_the_container_refuses_the_configuration_at_build_time(tmp_path):
    metadata = LMCacheMetadata("org/" + "m" * 200, 1, 0, torch.bfloat16, (2, 2, 16, 8, 64))
    layout = KVCacheLayout("cpu_packed", 16, 8, 64)
    cfg = compose_config(["chunk_size=16", "storage/backends=[local_cpu,remote]",
                          "remote_connector=fs", f"remote_url=fs://{tmp_path}/shared"])
    with pytest.raises(ValueError, match=r"remote_url fs:// .*NAME_MAX"):
        build_worker_container(cfg, metadata, layout).engine()
