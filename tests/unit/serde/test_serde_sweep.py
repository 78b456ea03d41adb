"""The serde sweep (``make run``'s size-vs-quality step) on a tiny config: every serde through
a real remote tier (fs:// files) on the trained tiny Llama's real KV, combined into one table,
CSV and plot by the Hydra callback."""

from __future__ import annotations

import csv

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from lmcache.experiments import serde_report, serde_sweep
from lmcache.experiments.lmcache_config import ExperimentConfigError

SERDES = ("naive", "cachegen", "kivi", "fp8")
TINY = ["documents.count=1", "documents.tokens=256", "gen_tokens=8", "repeats=1"]


def app_cfg(overrides=()):
    with initialize_config_module(config_module="lmcache.conf", version_base="1.3"):
        cfg = compose(config_name=serde_sweep.CONFIG_NAME, overrides=[*TINY, *overrides])
    return cfg


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Each serde as a multirun job folder ``<sweep>/<n>/``, then the callback's combine."""
    root = tmp_path_factory.mktemp("serde_sweep")
    for n, name in enumerate(SERDES):
        serde_sweep.run_job(app_cfg([f"remote_serde={name}"]), root / str(n))
    serde_report.SerdeSweepReport("serde_sweep.csv").on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}}))
    with (root / "sweep.csv").open() as f:
        rows = {r["remote_serde"]: r for r in csv.DictReader(f)}
    return root, rows


def test_sweep_table_values(sweep):
    root, rows = sweep
    assert list(rows) == list(SERDES)
    f = {name: {k: float(v) for k, v in r.items()
                if k not in ("remote_serde", "serde_overrides", "job")} for name, r in rows.items()}
    naive = f["naive"]
    # naive: the raw bf16 bytes (2 B x 2 x 4 layers x 128), the reference pass itself
    assert naive["bytes_per_token"] == 2048.0 and naive["x_smaller_than_bf16"] == 1.0
    assert naive["greedy_agreement_pct"] == 100.0 and naive["teacher_forced_top1_pct"] == 100.0
    assert naive["max_rel_error"] == 0.0
    # fp8: one byte per element + per-(K/V, layer, head) scales and the 32-byte header
    assert f["fp8"]["x_smaller_than_bf16"] == 2.0 and 1024 < f["fp8"]["bytes_per_token"] < 1026
    # kivi 2-bit, group 32: 2 bits + two fp16 per 32 elements = 3 bits/element = 16/3
    assert f["kivi"]["x_smaller_than_bf16"] == pytest.approx(5.33, abs=0.01)
    assert f["cachegen"]["x_smaller_than_bf16"] > 3.0
    for name in ("cachegen", "kivi", "fp8"):
        r = f[name]
        assert 0 < r["max_rel_error"] < 0.5
        assert 0.0 <= r["greedy_agreement_pct"] <= 100.0
        assert r["teacher_forced_top1_pct"] >= 75.0
        assert r["nll_naive_output"] == pytest.approx(naive["nll_naive_output"], rel=0.05)
    for r in f.values():
        assert r["ttft_ms"] > 0 and r["ttft_prefill_ms"] > 0 and r["gen_tokens"] == 8
    assert (root / "sweep.png").stat().st_size > 10_000
    log = (root / "sweep.log").read_text()
    assert "cachegen" in log and "5.33x" in log and "100.0 %" in log
    assert not (root / "0" / "remote_fs").exists()  # the job removed its chunk files


def test_serde_overrides_reach_the_remote_tier(tmp_path):
    cfg = app_cfg(["remote_serde=kivi", "serde_overrides=['serde.group_size=64']"])
    row = serde_sweep.run_job(cfg, tmp_path)
    assert row["x_smaller_than_bf16"] == pytest.approx(6.4, abs=0.01)
    assert row["serde_overrides"] == "serde.group_size=64"


@pytest.mark.parametrize("overrides, message", [
    (["remote_serde=zfp"], "remote_serde='zfp': expected one of the serde options"),
    (["documents.tokens=300"], "documents.tokens=300"),
    (["gen_tokens=0"], "gen_tokens=0"),
])
def test_bad_config_names_the_value(tmp_path, overrides, message):
    with pytest.raises(ExperimentConfigError, match=message.replace("[", r"\[")):
        serde_sweep.run_job(app_cfg(overrides), tmp_path)


def test_packaged_config_defaults():
    cfg = app_cfg()
    assert cfg.remote_serde == "naive" and cfg.remote_connector == "fs" and cfg.chunk_size == 256
    assert list(cfg.serde_overrides) == [] and cfg.model == "trained"
