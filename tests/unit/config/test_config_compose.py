"""compose_config over the installed lmcache.conf package."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from lmcache.config import compose_config, list_groups, list_options
from lmcache.config.checks import option_name
from lmcache.config.compose import gib_to_bytes


def test_defaults():
    cfg = compose_config()
    assert cfg.chunk_size == 256 and cfg.save_unfull_chunk is False
    assert cfg.hash_algorithm == "sha256_cbor" and cfg.hash_seed is None
    assert cfg.max_local_cpu_size == 5.0 and cfg.save_decode_cache is False
    assert cfg.blocking_timeout_secs == 10
    assert option_name(cfg.token_database) == "chunked"
    assert cfg.token_database.chunk_size == 256
    assert option_name(cfg.allocator) == "cpu" and cfg.allocator.size_bytes == 5 * 1024**3
    assert option_name(cfg.storage.policy) == "lru"
    assert list(cfg.storage.backends) == ["local_cpu"]
    assert option_name(cfg.gpu_connector) == "vllm_paged"
    assert cfg.blend is None  # the null option
    assert cfg.get("remote_connector") is None
    assert "hydra" not in cfg


def test_overrides_interpolate_into_options():
    cfg = compose_config(["chunk_size=512", "max_local_cpu_size=0.5", "save_unfull_chunk=true",
                          "hash_seed=abc", "storage/policy=mru"])
    assert cfg.token_database.chunk_size == 512
    assert cfg.token_database.save_unfull_chunk is True
    assert cfg.token_database.hash_seed == "abc"
    assert cfg.allocator.size_bytes == 512 * 1024**2
    assert cfg.storage.backends.local_cpu.max_local_cpu_size == 0.5
    assert option_name(cfg.storage.policy) == "mru"


def test_tier_order_is_list_order():
    cfg = compose_config(["storage/backends=[local_disk,local_cpu]", "local_disk=/x",
                          "max_local_disk_size=1"])
    assert list(cfg.storage.backends) == ["local_disk", "local_cpu"]
    cfg = compose_config(["storage/backends=[local_cpu,local_disk]", "local_disk=/x"])
    assert list(cfg.storage.backends) == ["local_cpu", "local_disk"]


@pytest.mark.parametrize(("override", "twice"), [
    ("storage/backends=[local_cpu,local_cpu]", "local_cpu"),
    ("+storage/backends=[local_cpu,remote,remote]", "remote"),
    ("storage/backends=[local_cpu,local_disk,local_cpu,local_disk]", "local_cpu and local_disk"),
])
def test_an_option_selected_twice_is_an_error_naming_it(override, twice):
    with pytest.raises(ValueError) as err:
        compose_config([override])
    group = "storage/backends"
    assert str(err.value) == (f"{override!r} selects {twice} twice: {group} takes each option "
                              "once (Hydra would merge the copies into one, silently)")
    # without the check Hydra composes one tier: what the error prevents
    cfg = compose_config(["storage/backends=[local_cpu,local_disk]"])
    assert list(cfg.storage.backends) == ["local_cpu", "local_disk"]
    with pytest.raises(ValueError, match=r"malformed override 'storage/backends=\[local_cpu,' "
                       r"\(from compose_config overrides\)"):
        compose_config(["storage/backends=[local_cpu,"])


def test_deployment_wins_over_defaults_and_command_line_wins_over_deployment():
    cfg = compose_config(["deployment=cpu"])
    assert cfg.max_local_cpu_size == 4.0 and cfg.allocator.size_bytes == 4 * 1024**3
    cfg = compose_config(["deployment=cpu", "max_local_cpu_size=3"])
    assert cfg.max_local_cpu_size == 3 and cfg.allocator.size_bytes == 3 * 1024**3


def test_unknown_names_fail_composition():
    with pytest.raises(MissingConfigException):
        compose_config(["storage/policy=xyz"])
    with pytest.raises(ValueError, match="'no_such_key=1' .* not in lmcache's config"):
        compose_config(["no_such_key=1"])
    with pytest.raises(TypeError, match="list of strings"):
        compose_config("chunk_size=1")


def test_repeated_calls_leave_no_global_hydra_state():
    assert not GlobalHydra.instance().is_initialized()
    first = compose_config(["chunk_size=16"])
    second = compose_config(["chunk_size=32"])
    assert (first.chunk_size, second.chunk_size) == (16, 32)
    assert not GlobalHydra.instance().is_initialized()


def test_inside_a_running_hydra_app(tmp_path):
    """A @hydra.main app (pkg://lmcache.conf) can compose another config and keeps its own
    Hydra state (HydraConfig, GlobalHydra) afterwards."""
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import hydra
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig
        from lmcache.config import compose_config

        @hydra.main(config_path="pkg://lmcache.conf", config_name="config", version_base="1.3")
        def main(cfg):
            before = GlobalHydra.instance().hydra
            inner = compose_config(["chunk_size=64"])
            again = compose_config(["chunk_size=32"])
            assert GlobalHydra.instance().hydra is before
            print("RESULT", cfg.chunk_size, inner.chunk_size, again.chunk_size,
                  HydraConfig.get().job.name)

        main()
    """))
    out = subprocess.run(
        [sys.executable, str(script), "chunk_size=128", f"hydra.run.dir={tmp_path}/run",
         "hydra.output_subdir=null"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RESULT 128 64 32 app" in out.stdout


def test_installed_package_is_found_from_any_cwd(tmp_path):
    code = ("import importlib.resources as r; f = r.files('lmcache.conf'); "
            "print(sorted(p.name for p in f.iterdir() if p.name.endswith('.yaml')), "
            "sorted(p.name for p in (f / 'storage' / 'policy').iterdir()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['config.yaml']" in out.stdout and "'lru.yaml'" in out.stdout


def test_groups_and_options_are_discovered():
    groups = list_groups()
    for group in ("token_database", "allocator", "storage/policy", "storage/backends",
                  "gpu_connector", "blend", "deployment"):
        assert group in groups
    assert list_options("storage/policy") == ["fifo", "lfu", "lru", "mru"]
    assert "local_cpu" in list_options("storage/backends")
    assert list_options("no/such/group") == []


def test_gib_to_bytes():
    assert gib_to_bytes(5.0) == 5 * 1024**3 and gib_to_bytes("0.5") == 512 * 1024**2
    with pytest.raises(ValueError, match="expected a size in GiB"):
        gib_to_bytes("lots")
    with pytest.raises(ValueError, match="expected a size in GiB"):
        gib_to_bytes(True)
    cfg = compose_config(["max_local_cpu_size=abc"])
    with pytest.raises(Exception, match="expected a size in GiB"):
        OmegaConf.to_container(cfg, resolve=True)
