"""Per-round summary, CSV writer, rich table and output comparison of long-document QA."""

from __future__ import annotations

import csv

import pytest
from rich.console import Console

from lmcache.experiments import report


def row(key, rnd, ttft, hits, out, prompt=1000):
    return {"request_key": key, "round": rnd, "doc_index": int(key[1]), "question_index": rnd,
            "prompt_tokens": prompt, "ttft_s": ttft, "prefill_s": ttft * 0.9, "hit_tokens": hits,
            "output_token_ids": out, "lookup_ms": 0.5, "hash_ms": 0.25,
            "load_ms": 3.0 if hits else 0.0, "store_ms": 0.0 if hits else 4.0}


WITHOUT = [row("d0#q0", 0, 2.0, 0, [1, 2]), row("d1#q0", 0, 1.0, 0, [3, 4]),
           row("d0#q1", 1, 2.0, 0, [5, 6]), row("d1#q1", 1, 2.0, 0, [7, 8])]
WITH = [row("d0#q0", 0, 2.5, 0, [1, 2]), row("d1#q0", 0, 1.5, 0, [3, 4]),
        row("d0#q1", 1, 0.5, 768, [5, 6]), row("d1#q1", 1, 0.5, 512, [7, 8])]


def test_summarize_both_passes():
    s = report.summarize_rounds(WITHOUT, WITH)
    assert [x["round"] for x in s] == [1, 2] and [x["phase"] for x in s] == ["cold", "warm"]
    cold, warm = s
    assert cold["requests"] == 2 and cold["prompt_tokens_mean"] == 1000
    assert cold["ttft_without_lmcache_s"] == pytest.approx(1.5)  # median of 2.0 and 1.0
    assert cold["ttft_without_lmcache_p25_s"] == pytest.approx(1.25)
    assert cold["ttft_without_lmcache_p75_s"] == pytest.approx(1.75)
    assert cold["ttft_with_lmcache_s"] == pytest.approx(2.0)
    # paired ratios: d0 2.0/2.5 = 0.8, d1 1.0/1.5 = 0.667
    assert cold["speedup"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert cold["speedup_p25"] == pytest.approx(2 / 3 + 0.25 * (0.8 - 2 / 3))
    assert cold["spread_exceeds_effect"] is False
    assert cold["hit_tokens_with_lmcache"] == 0 and cold["hit_rate_with_lmcache"] == 0
    assert warm["speedup"] == pytest.approx(4.0)
    assert warm["hit_tokens_without_lmcache"] == 0
    assert warm["hit_tokens_with_lmcache"] == 640  # mean per request
    assert warm["hit_rate_with_lmcache"] == pytest.approx(0.64)
    assert cold["outputs_identical"] is True and warm["outputs_identical"] is True
    assert warm["lookup_ms"] == pytest.approx(0.5) and warm["load_ms"] == pytest.approx(3.0)
    # total = lookup + load + store (the hashing runs inside them)
    assert warm["lmcache_ms"] == pytest.approx(0.5 + 3.0) and cold["store_ms"] == 4.0
    assert set(cold) == set(report.ROUND_COLUMNS)


def test_quartiles_and_pairs_by_repeat():
    assert report.quartiles([3.0]) == (3.0, 3.0, 3.0)
    assert report.quartiles([4, 1, 3, 2, 5]) == (2.0, 3.0, 4.0)
    with pytest.raises(ValueError, match="at least one value"):
        report.quartiles([])
    # the same request in two repeats: ratios pair by (request, repeat), not by order
    a = [dict(row("d0#q0", 0, 1.0, 0, [1]), repeat=0), dict(row("d0#q0", 0, 3.0, 0, [1]), repeat=1)]
    b = [dict(row("d0#q0", 0, 2.5, 0, [1]), repeat=1), dict(row("d0#q0", 0, 1.1, 0, [1]), repeat=0)]
    (s,) = report.summarize_rounds(a, b)
    assert s["requests"] == 2 and s["speedup"] == pytest.approx((1 / 1.1 + 3 / 2.5) / 2)
    assert s["speedup_p25"] < 1.0 < s["speedup_p75"] and s["spread_exceeds_effect"] is True
    assert report.noise_notes([s]) == [
        f"note: round 1 (cold): the speedup's spread {s['speedup_p25']:.2f}-"
        f"{s['speedup_p75']:.2f} includes 1.00, so the difference between the passes there is "
        "within this machine's noise"]
    assert report.noise_notes(report.summarize_rounds(WITHOUT, WITH)) == []


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
    assert rows[1]["hit_tokens_with_lmcache"] == "640"
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
    assert back[6]["repeat"] == "0" and back[6]["load_ms"] == "3" and back[4]["store_ms"] == "4"


def test_write_csv_rejects_missing_column(tmp_path):
    with pytest.raises(ValueError, match=r"row 0 lacks column\(s\) \['speedup'\]"):
        report.write_csv([{"round": 1}], tmp_path / "x.csv", ["round", "speedup"])


def test_render_tables():
    console = Console(record=True, width=80)
    summary = report.summarize_rounds(WITHOUT, WITH)
    console.print(report.render_table(summary))
    console.print(report.render_costs(summary))
    text = console.export_text()
    assert "1 cold" in text and "2 warm" in text
    assert "4.00x" in text and "0.73x" in text and "640" in text
    assert "1500.0" in text and "500.0" in text  # ms
    assert "0.70-0.77" in text  # the cold round's spread
    assert "…" not in text  # nothing truncated at 80 columns
    lines = text.splitlines()
    assert any(ln.split("│")[1:-1] and ln.split("│")[-2].strip() == "yes" for ln in lines)
    cost = next(ln for ln in lines if "2 warm" in ln and "3.50" in ln)
    assert [c.strip() for c in cost.split("│")[1:-1]] == [
        "2 warm", "0.50", "0.25", "3.00", "0.00", "3.50", "0.7"]
