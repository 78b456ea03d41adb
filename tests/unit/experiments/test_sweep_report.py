"""A multirun's per-job CSVs combine into one CSV, one plot and one table (SweepReport)."""

from __future__ import annotations

import csv
import logging

from omegaconf import OmegaConf

from lmcache.experiments import report
from lmcache.experiments.console import Reporter
from lmcache.experiments.sweep import SweepReport, read_job_csvs, varying_keys


def rows(ttft_with):
    def r(key, rnd, ttft, hits):
        return {"request_key": key, "round": rnd, "repeat": 0, "prompt_tokens": 1000,
                "ttft_s": ttft, "hit_tokens": hits, "output_token_ids": [1]}
    without = [r("d0#q0", 0, 1.0, 0), r("d0#q1", 1, 1.0, 0)]
    with_ = [r("d0#q0", 0, 1.0, 0), r("d0#q1", 1, ttft_with, 512)]
    return report.summarize_rounds(without, with_)


def test_sweep_combines_jobs(tmp_path, capsys):
    for job, chunk, ttft in (("0", "256", 0.5), ("1", "512", 0.25)):
        s = [{"chunk_size": chunk, "repeats": "2", **x} for x in rows(ttft)]
        report.write_csv(s, tmp_path / job / "long_doc_qa.csv",
                         ["chunk_size", "repeats", *report.ROUND_COLUMNS])
    (tmp_path / "multirun.yaml").write_text("x: 1")  # other files are ignored
    keys, got = read_job_csvs(tmp_path, "long_doc_qa.csv")
    assert keys == ["chunk_size", "repeats"] and [r["job"] for r in got] == ["0", "0", "1", "1"]
    assert varying_keys(keys, got) == ["chunk_size"]  # repeats=2 in every job

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    SweepReport(csv_name="long_doc_qa.csv").on_multirun_end(cfg)
    with (tmp_path / "sweep.csv").open() as f:
        combined = list(csv.DictReader(f))
    assert list(combined[0])[:4] == ["job", "chunk_size", "repeats", "round"]
    assert [(r["chunk_size"], r["round"], r["speedup"]) for r in combined] == [
        ("256", "1", "1"), ("256", "2", "2"), ("512", "1", "1"), ("512", "2", "4")]
    png = (tmp_path / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    out = capsys.readouterr().out
    assert "4.00x" in out and "2.00x" in out and "512" in out and "repeats" not in out
    assert f"sweep CSV: {tmp_path / 'sweep.csv'}" in out
    assert f"sweep plot: {tmp_path / 'sweep.png'}" in out
    logged = (tmp_path / "sweep.log").read_text()
    assert "4.00x" in logged and f"sweep plot: {tmp_path / 'sweep.png'}" in logged


def test_sweep_without_results_says_so(tmp_path, capsys):
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    SweepReport().on_multirun_end(cfg)
    assert f"sweep: no job wrote long_doc_qa.csv under {tmp_path}" in capsys.readouterr().out
    assert not (tmp_path / "sweep.csv").exists()


def test_reporter_lines_tables_and_round_lines_reach_the_log(caplog, capsys):
    caplog.set_level(logging.INFO, logger="lmcache.experiments")
    say = Reporter(progress=True, width=40)
    long_path = "/a/very/long/output/directory/that/is/wider/than/the/console/long_doc_qa.csv"
    say.line(f"per-round CSV: {long_path}")
    for rep, rnd, p, ttft in ((0, 0, "a", 0.1), (0, 0, "b", 0.3), (0, 1, "a", 0.2)):
        say.on_result(p, {"repeat": rep, "round": rnd, "ttft_s": ttft, "hit_tokens": 256 * rnd})
    say.flush_round()
    say.table(report.render_table(rows(0.5)))
    out = capsys.readouterr().out
    assert f"per-round CSV: {long_path}\n" in out  # whole, not wrapped
    assert "repeat 1 round 1 (cold), 1 requests, median TTFT: a 100 ms (0 hit tokens), b 300 ms" in out
    assert "repeat 1 round 2 (warm), 1 requests, median TTFT: a 200 ms (256 hit tokens)" in out
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"per-round CSV: {long_path}"
    assert any("2.00x" in m for m in messages)  # the table, as text
