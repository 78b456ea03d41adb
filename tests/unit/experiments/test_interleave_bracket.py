"""The bracketed plan (A B A): the baseline pass measured before and after the other, its two
TTFTs merged into their geometric mean, one row per pass and step."""

from __future__ import annotations

import math

import pytest

from lmcache.experiments import interleave

REQS = [{"request_key": f"d{d}#q0", "round": 0, "doc_index": d, "prompt_token_ids": [1, 10 + d, 7]}
        for d in range(2)]


def test_bracketed_plan_and_merged_rows():
    steps = interleave.plan(REQS, 1, ["base", "lmc"], 100, bracket="base")
    assert [order for order, _ in steps] == [("base", "lmc", "base")] * 2
    ttfts = iter([1.0, 0.5, 4.0, 2.0, 0.25, 2.0])
    calls, seen = [], []

    def run(name, r):
        calls.append((name, r["request_key"]))
        return {"ttft_s": next(ttfts), "prefill_s": 0.1, "hit_tokens": 0, "key": r["request_key"]}

    out = interleave.run_plan(steps, run, lambda n, row: seen.append((n, row["ttft_s"])))
    assert calls == [("base", "d0#q0"), ("lmc", "d0#q0"), ("base", "d0#q0"),
                     ("base", "d1#q0"), ("lmc", "d1#q0"), ("base", "d1#q0")]
    assert [r["ttft_s"] for r in out["base"]] == [2.0, math.sqrt(4.0)]  # sqrt(1*4), sqrt(2*2)
    assert [r["ttft_s"] for r in out["lmc"]] == [0.5, 0.25]
    assert out["base"][0]["prefill_s"] == pytest.approx(0.1) and out["base"][1]["key"] == "d1#q0"
    assert seen == [("base", 2.0), ("lmc", 0.5), ("base", 2.0), ("lmc", 0.25)]
    single = interleave.plan(REQS, 1, ["base"], 100, bracket="base")  # nothing to bracket
    assert [order for order, _ in single] == [("base",), ("base",)]
    with pytest.raises(ValueError, match="bracket='x' is not one of the passes"):
        interleave.plan(REQS, 1, ["base", "lmc"], 100, bracket="x")
