"""``python -m lmcache`` prints the version and the commands."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import lmcache
from lmcache.__main__ import COMMANDS, describe


def test_python_m_lmcache_prints_version_and_commands():
    proc = subprocess.run([sys.executable, "-m", "lmcache"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"lmcache {lmcache.__version__} (python ")
    assert "python -m lmcache.experiments.long_doc_qa [overrides]" in proc.stdout
    assert "lmcache-server [HOST] [PORT]" in proc.stdout
    assert "vLLM installed: " in lines[1]


def test_every_console_script_and_listed_module_exists():
    text = describe()
    pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    assert set(scripts) == {"lmcache-server", "lmcache-controller", "lmcache-mp-server"}
    for name in scripts:  # every installed command is listed, with its module form
        assert f"  {name} " in text
    modules = [m for cmd, _ in COMMANDS for m in re.findall(r"python -m ([\w.]+)", cmd)]
    assert "lmcache.experiments.multi_instance" in modules and "lmcache.controller" in modules
    for mod in modules:  # runnable with -m: a module, or a package with a __main__
        spec = importlib.util.find_spec(mod)
        assert spec is not None, mod
        if spec.submodule_search_locations is not None:
            assert importlib.util.find_spec(f"{mod}.__main__") is not None, mod


def test_cfg_job_resolve_shows_the_lmcache_tree():
    proc = subprocess.run([sys.executable, "-m", "lmcache.experiments.long_doc_qa", "--cfg", "job",
                           "--resolve", "deployment=cpu_disk", "local_disk=/tmp/kv", "chunk_size=512"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "size_bytes: 1073741824" in out  # max_local_cpu_size 1.0 GiB, resolved
    assert "      local_disk: /tmp/kv" in out and "max_local_disk_size: 20.0" in out
    assert "  chunk_size: 512" in out and "LRUCachePolicy" in out
