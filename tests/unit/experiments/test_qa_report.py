"""Per-round summary, CSV writer, rich table and output comparison of long-document QA."""

from __future__ import annotations

import csv

import pytest
from rich.console import Console

from lmcache.experiments import report


def row(key, rnd, ttft, hits, out, prompt=1000):
    return {"request_key": key, "round": rnd, "doc_index": int(key[1]), "question_index": rnd,
            "prompt_tokens": prompt, "ttft_s": ttft, "prefill_s": ttft * 0.9, "hit_tokens": hits,
            "output_token_ids": out}


WITHOUT = [row("d0#q0", 0, 2.0, 0, [1, 2]), row("d1#q0", 0, 1.0, 0, [3, 4]),
           row("d0#q1", 1, 2.0, 0, [5, 6]), row("d1#q1", 1, 2.0, 0, [7, 8])]
WITH = [row("d0#q0", 0, 2.5, 0, [1, 2]), row("d1#q0", 0, 1.5, 0, [3, 4]),
        row("d0#q1", 1, 0.5, 768, [5, 6]), row("d1#q1", 1, 0.5, 512, [7, 8])]


def test_summarize_both_passes():
    s = report.summarize_rounds(WITHOUT, WITH)
    assert [x["round"] for x in s] == [1, 2] and [x["phase"] for x in s] == ["cold", "warm"]
    cold, warm = s
    assert cold["requests"] == 2 and cold["prompt_tokens_mean"] == 1000
    assert cold["ttft_without_lmcache_s"] == pytest.approx(1.5)
    assert cold["ttft_with_lmcache_s"] == pytest.approx(2.0)
    assert cold["speedup"] == pytest.approx(0.75)
    assert cold["hit_tokens_with_lmcache"] == 0 and cold["hit_rate_with_lmcache"] == 0
    assert warm["speedup"] == pytest.approx(4.0)
    assert warm["hit_tokens_without_lmcache"] == 0
    assert warm["hit_tokens_with_lmcache"] == 1280
    assert warm["hit_rate_with_lmcache"] == pytest.approx(0.64)
    assert cold["outputs_identical"] is True and warm["outputs_identical"] is True
    assert set(cold) == set(report.ROUND_COLUMNS)


def test_summarize_one_pass_and_mismatch():
    s = report.summarize_rounds(WITHOUT, None)
    assert s[0]["ttft_with_lmcache_s"] is None and s[0]["speedup"] is None
    assert s[0]["outputs_identical"] is None and s[0]["hit_tokens_with_lmcache"] is None
    bad = [dict(r) for r in WITH]
    bad[3]["output_token_ids"] = [7, 9]
    s = report.summarize_rounds(WITHOUT, bad)
    assert [x["outputs_identical"] for x in s] == [True, False]
    with pytest.raises(ValueError, match="at least one pass"):
        report.summarize_rounds(None, [])


def test_mismatched_outputs():
    assert report.mismatched_outputs(WITHOUT, WITH) == []
    bad = [dict(r) for r in WITH[:3]]
    bad[0]["output_token_ids"] = [1, 3]
    assert report.mismatched_outputs(WITHOUT, bad) == ["d0#q0", "d1#q1"]  # changed, then missing


def test_write_csv_round_trip(tmp_path):
    s = report.summarize_rounds(WITHOUT, WITH)
    path = report.write_csv(s, tmp_path / "sub" / "rounds.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(report.ROUND_COLUMNS)
    assert rows[1]["round"] == "2" and rows[1]["phase"] == "warm"
    assert float(rows[1]["speedup"]) == pytest.approx(4.0)
    assert rows[1]["hit_tokens_with_lmcache"] == "1280"
    assert rows[1]["outputs_identical"] == "True"
    only = report.write_csv(report.summarize_rounds(WITHOUT, None), tmp_path / "one.csv")
    with only.open() as f:
        first = next(csv.DictReader(f))
    assert first["ttft_with_lmcache_s"] == "" and first["speedup"] == ""


def test_write_requests_csv(tmp_path):
    rows = report.request_rows({"without_lmcache": WITHOUT, "with_lmcache": WITH})
    assert [r["round"] for r in rows[:4]] == [1, 1, 2, 2]  # 1-based like the summary
    path = report.write_csv(rows, tmp_path / "req.csv", report.REQUEST_COLUMNS)
    with path.open() as f:
        back = list(csv.DictReader(f))
    assert len(back) == 8 and back[4]["pass"] == "with_lmcache"
    assert back[6]["hit_tokens"] == "768" and back[6]["output_token_ids"] == "5 6"


def test_write_csv_rejects_missing_column(tmp_path):
    with pytest.raises(ValueError, match=r"row 0 lacks column\(s\) \['speedup'\]"):
        report.write_csv([{"round": 1}], tmp_path / "x.csv", ["round", "speedup"])


def test_render_table():
    console = Console(record=True, width=80)
    console.print(report.render_table(report.summarize_rounds(WITHOUT, WITH)))
    text = console.export_text()
    assert "1 cold" in text and "2 warm" in text
    assert "4.00x" in text and "0.75x" in text and "1280" in text
    assert "1500.0" in text and "500.0" in text  # ms
    assert "…" not in text  # nothing truncated at 80 columns
    lines = text.splitlines()
    assert any(ln.split("│")[1:-1] and ln.split("│")[-2].strip() == "yes" for ln in lines)
