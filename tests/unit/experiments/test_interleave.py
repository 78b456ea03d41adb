"""Measurement order of the long-document QA experiment: repeats on salted documents, ABBA."""

from __future__ import annotations

import pytest

from lmcache.experiments import interleave


def req(doc, rnd, prompt):
    return {"request_key": f"d{doc}#q{rnd}", "round": rnd, "doc_index": doc,
            "prompt_token_ids": list(prompt)}


REQS = [req(0, 0, [1, 50, 51, 60]), req(1, 0, [1, 70, 71, 60]),
        req(0, 1, [1, 50, 51, 61]), req(1, 1, [1, 70, 71, 61])]


def test_plan_repeats_salt_and_alternates():
    steps = interleave.plan(REQS, 2, ["a", "b"], vocab_size=100)
    assert len(steps) == 8
    assert [o for o, _ in steps] == [("a", "b"), ("b", "a")] * 4
    assert [(r["repeat"], r["round"], r["doc_index"]) for _, r in steps] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    first = [r["prompt_token_ids"] for _, r in steps[:4]]
    assert first == [r["prompt_token_ids"] for r in REQS]  # repeat 0 unchanged
    second = [r["prompt_token_ids"] for _, r in steps[4:]]
    s0, s1 = interleave.salt_token(50, 1, 100), interleave.salt_token(70, 1, 100)
    assert second == [[1, s0, 51, 60], [1, s1, 71, 60], [1, s0, 51, 61], [1, s1, 71, 61]]
    assert s0 != 50 and s1 != 70 and 3 <= s0 < 100
    assert REQS[0]["prompt_token_ids"] == [1, 50, 51, 60]  # inputs not modified


def test_salt_token_never_equals_original():
    for vocab in (5, 17, 4096):
        for orig in range(vocab):
            for rep in (1, 2, 3):
                tok = interleave.salt_token(orig, rep, vocab)
                assert tok != orig and 3 <= tok < vocab
    with pytest.raises(ValueError, match="repeat >= 1"):
        interleave.salt_token(5, 0, 100)


@pytest.mark.parametrize("repeats, passes, reqs, match", [
    (0, ["a"], REQS, "repeats=0"), (1, [], REQS, "at least one pass"),
    (1, ["a"], [req(0, 0, [1])], "at least 2")])
def test_plan_rejects_bad_input(repeats, passes, reqs, match):
    with pytest.raises(ValueError, match=match):
        interleave.plan(reqs, repeats, passes, 100)


def test_run_plan_runs_each_pass_in_order():
    calls = []
    steps = interleave.plan(REQS[:2], 1, ["a", "b"], 100)

    def run(name, r):
        calls.append((name, r["request_key"]))
        return {"pass": name, "key": r["request_key"]}

    seen = []
    out = interleave.run_plan(steps, run, lambda n, row: seen.append(n))
    assert calls == [("a", "d0#q0"), ("b", "d0#q0"), ("b", "d1#q0"), ("a", "d1#q0")]
    assert [r["key"] for r in out["a"]] == ["d0#q0", "d1#q0"] and seen == ["a", "b", "b", "a"]
