"""Config errors are early and named (issue 7, kind 10): the CPU buffer against the machine's
memory before anything is built, malformed overrides with their source, misspelled keys added
with '+', and the effective config logged once with the source of every non-default value."""

from __future__ import annotations

import logging
import uuid

import pytest
import torch

from lmcache.config import compose_config
from lmcache.config.checks import check_config, machine_memory
from lmcache.config.effective import effective_config_lines, log_effective_config
from lmcache.containers import build_worker_container
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.integration.vllm.engine_builder import compose_from_vllm
from lmcache.metadata import LMCacheMetadata

META = LMCacheMetadata("org/model", 1, 0, torch.float32, (2, 2, 16, 2, 8))
LAYOUT = KVCacheLayout("cpu_packed", block_size=16, num_kv_heads=2, head_size=8)


def test_machine_memory_reads_proc_meminfo():
    total, available, where = machine_memory()
    with open("/proc/meminfo") as f:
        mem_total = int(f.readline().split()[1]) * 1024
    assert total is not None and 0 < total <= mem_total
    assert available is not None and 0 < available <= mem_total
    assert "/proc/meminfo" in where or "cgroup" in where


def test_cpu_buffer_larger_than_the_machine_fails_before_anything_is_built():
    total_gib = machine_memory()[0] / 1024**3
    cfg = compose_config(["max_local_cpu_size=100000"])
    expected = (f"config key max_local_cpu_size=100000 GiB is more than this machine's memory "
                f"({total_gib:.1f} GiB, ")
    for role in ("scheduler", "worker"):
        with pytest.raises(ValueError) as err:
            check_config(cfg, role=role)
        assert str(err.value).startswith(expected)
        assert str(err.value).endswith("the CPU tier's buffer is allocated whole at start: "
                                       "lower max_local_cpu_size")
    with pytest.raises(ValueError, match="max_local_cpu_size=100000 GiB is more than"):
        build_worker_container(cfg, META, LAYOUT)  # checked before any provider is called
    # the same from LMCache's env through vLLM's path
    with pytest.raises(ValueError, match="max_local_cpu_size=100000.0 GiB is more than"):
        check_config(compose_config(["++max_local_cpu_size=100000.0"]), role="scheduler")
    check_config(compose_config(["max_local_cpu_size=0.5"]), role="scheduler")  # fits


@pytest.mark.parametrize("bad", ["deployment=[cpu", "storage/backends=[local_cpu,", "=5",
                                 "chunk_size=512)"])
def test_malformed_override_names_itself_and_its_source(bad):
    with pytest.raises(ValueError) as err:
        compose_from_vllm({"lmcache.overrides": ["chunk_size=32", bad]})
    message = str(err.value)
    assert message.startswith(
        f"malformed override {bad!r} (from kv_connector_extra_config['lmcache.overrides']): ")
    assert "expected key=value, group=option" in message
    with pytest.raises(ValueError, match=r"\(from my job\)"):
        compose_config([bad], sources="my job")


@pytest.mark.parametrize(("override", "expected"), [
    ("+chunk_sise=512", "adds the key 'chunk_sise', which lmcache does not read; did you mean "
                        "chunk_size?"),
    ("++max_local_cpu_sise=1", "did you mean max_local_cpu_size or "),
    ("chunk_sise=512", "sets the key 'chunk_sise', which is not in lmcache's config; did you "
                       "mean chunk_size? (a new key needs a leading '+')"),
    ("+storage.backends.local_cpu.max_local_cpu_sise=1",
     "adds the key 'max_local_cpu_sise' to storage.backends.local_cpu "
     "(lmcache.storage.backends.local_cpu.LocalCPUBackend), which takes no such argument; did "
     "you mean max_local_cpu_size"),
])
def test_misspelled_keys_are_refused_with_did_you_mean(override, expected):
    with pytest.raises(ValueError) as err:
        compose_config([override])
    assert str(err.value).startswith(f"override {override!r} (from compose_config overrides) ")
    assert expected in str(err.value)


def test_keys_added_with_plus_that_exist_still_work():
    cfg = compose_config(["++storage.backends.local_cpu.local_cpu=false", "++chunk_size=64",
                          "++extra_config={tag_keys:[user]}"])
    assert (cfg.storage.backends.local_cpu.local_cpu, cfg.chunk_size) == (False, 64)
    assert cfg.extra_config == {"tag_keys": ["user"]}


def test_effective_config_names_the_source_of_every_non_default(tmp_path, monkeypatch, caplog):
    path = tmp_path / "lmcache.yaml"
    path.write_text(f"chunk_size: 128\nlocal_disk: {tmp_path}/kv\nmax_local_disk_size: 1\n"
                    "remote_url: valkey://user:secret@h:6379\nlocal_device: cpu\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(path))
    monkeypatch.setenv("LMCACHE_SAVE_UNFULL_CHUNK", "'true'")
    extra = {"lmcache.max_local_cpu_size": 0.5,
             "lmcache.overrides": ["storage/policy=fifo", "storage.backends.local_disk.num_writers=2"]}
    with caplog.at_level(logging.INFO, logger="lmcache.config.effective"):
        cfg = compose_from_vllm(extra)
        assert compose_from_vllm(extra) == cfg  # composed again (e.g. by the worker): not logged
    file = f"LMCACHE_CONFIG_FILE={str(path)!r}"
    native = "kv_connector_extra_config['lmcache.overrides']"
    records = [r.getMessage() for r in caplog.records if r.name == "lmcache.config.effective"]
    assert records == ["lmcache effective config (values that are not defaults, with their "
                       "source):\n  " + "\n  ".join([
        f"storage/backends=[local_cpu,local_disk,remote]  ({file})",
        f"remote_connector=valkey  ({file})",
        f"storage/policy=fifo  ({native})",
        f"chunk_size: 128  ({file})",
        "save_unfull_chunk: True  (environment variable LMCACHE_SAVE_UNFULL_CHUNK)",
        "max_local_cpu_size: 0.5  (kv_connector_extra_config['lmcache.max_local_cpu_size'])",
        f"local_disk: '{tmp_path}/kv'  ({file})",
        f"max_local_disk_size: 1.0  ({file})",
        f"remote_url: 'valkey://user:***@h:6379'  ({file})",
        f"storage.backends.local_disk.num_writers: 2  ({native})",
    ])]


def test_effective_config_is_logged_once_per_process(caplog):
    cfg = compose_config(["chunk_size=48"])
    label = f"test source {uuid.uuid4().hex}"  # a config this process has not logged yet
    with caplog.at_level(logging.INFO, logger="lmcache.config.effective"):
        first = log_effective_config(cfg, ["chunk_size=48"], label)
        again = log_effective_config(cfg, ["chunk_size=48"], label)
    assert first == ("lmcache effective config (values that are not defaults, with their "
                     f"source):\n  chunk_size: 48  ({label})")
    assert again is None
    assert caplog.text.count(f"chunk_size: 48  ({label})") == 1
    assert effective_config_lines(compose_config([]), []) == []
