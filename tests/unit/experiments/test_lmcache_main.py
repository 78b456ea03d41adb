"""``python -m lmcache`` prints the version and the commands."""

from __future__ import annotations

import subprocess
import sys

import lmcache


def test_python_m_lmcache_prints_version_and_commands():
    proc = subprocess.run([sys.executable, "-m", "lmcache"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"lmcache {lmcache.__version__} (python ")
    assert "python -m lmcache.experiments.long_doc_qa [overrides]" in proc.stdout
    assert "lmcache-server [HOST] [PORT]" in proc.stdout
    assert "vLLM installed: " in lines[1]
