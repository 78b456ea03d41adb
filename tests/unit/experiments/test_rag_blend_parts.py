"""The RAG blend experiment's pure parts: queries, salting, quality, summary, lmcache overrides."""

import pytest
from omegaconf import OmegaConf

from lmcache.experiments.rag_blend import blend_overrides
from lmcache.experiments.rag_blend_prompts import build_queries, contains, salted
from lmcache.experiments.rag_blend_report import add_quality, summarize

SEP = [7, 8]
SYSTEM = [1, 20, 21]
DOCS = [[100 + i] * (10 + i) for i in range(4)]
QUESTIONS = [(f"q{i}", [50 + i, 51]) for i in range(5)]


def test_queries_join_a_seeded_subset_of_documents_in_random_order():
    a = build_queries(DOCS, SYSTEM, SEP, QUESTIONS, 5, 2, 4, seed=3)
    assert a == build_queries(DOCS, SYSTEM, SEP, QUESTIONS, 5, 2, 4, seed=3)
    assert a != build_queries(DOCS, SYSTEM, SEP, QUESTIONS, 5, 2, 4, seed=4)
    for q in a:
        assert 2 <= len(q.doc_order) <= 4 and len(set(q.doc_order)) == len(q.doc_order)
        want = list(SYSTEM)
        for d in q.doc_order:
            want += SEP + DOCS[d]
        want += SEP + QUESTIONS[q.index][1]
        assert list(q.prompt_token_ids) == want
        assert q.cached_tokens == sum(len(DOCS[d]) for d in q.doc_order)
        assert q.uncached_tokens == len(want) - q.cached_tokens
        assert q.question == f"q{q.index}"
    assert len({q.doc_order for q in a}) > 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_docs=0), "queries.min_docs=0"),
    (dict(max_docs=5), "max_docs=5"),
    (dict(count=0), "queries.count=0"),
])
def test_bad_query_settings_are_named(kwargs, message):
    args = dict(count=5, min_docs=2, max_docs=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_queries(DOCS, SYSTEM, SEP, QUESTIONS[:max(args["count"], 0)], args["count"],
                      args["min_docs"], args["max_docs"], seed=0)


def test_a_document_holding_the_separator_is_refused():
    docs = [*DOCS[:3], [1, 7, 8, 2]]
    assert contains(docs[3], SEP) and not contains(DOCS[0], SEP)
    with pytest.raises(ValueError, match="document 3 holds the separator"):
        build_queries(docs, SYSTEM, SEP, QUESTIONS, 5, 2, 4, seed=0)


def test_salting_changes_only_the_system_token_and_never_to_a_separator_token():
    ids = list(SYSTEM) + SEP + DOCS[0]
    assert salted(ids, 0, 1000, SEP) == ids
    for rep in range(1, 30):
        out = salted(ids, rep, 1000, SEP)
        assert out[1] != ids[1] and out[1] not in SEP
        assert out[:1] + out[2:] == ids[:1] + ids[2:]
    assert salted(ids, 1, 1000, SEP) != salted(ids, 2, 1000, SEP)


def _row(name, key, top1, logprobs, **kw):
    return {"pass": name, "request_key": key, "repeat": 0, "prompt_tokens": 100,
            "ttft_s": kw.pop("ttft", 0.1), "hit_tokens": 0, "reused_tokens": 0,
            "recomputed_tokens": 100, "blended": False, "output_token_ids": [1, 2, 3, 4],
            "top1_token_ids": top1, "token_logprobs": logprobs, "ratio": None, **kw}


def test_quality_and_checks_against_the_no_cache_output():
    by_pass = {
        "no_cache": [_row("no_cache", "a", [1, 2, 3, 4], [-1.0, -1.0, -1.0, -1.0], ttft=0.2)],
        "blend_1": [_row("blend_1", "a", [1, 2, 3, 4], [-1.0, -1.0, -1.0, -1.0], ratio=1.0,
                         blended=True, reused_tokens=90, hit_tokens=99)],
        "blend_0": [_row("blend_0", "a", [1, 9, 3, 9], [-1.0, -2.0, -1.0, -2.0], ratio=0.0,
                         blended=True, reused_tokens=90, recomputed_tokens=10, ttft=0.05)],
    }
    add_quality(by_pass)
    assert by_pass["blend_0"][0]["agreement"] == 0.5
    assert by_pass["blend_0"][0]["nll"] == 1.5 and by_pass["blend_0"][0]["delta_nll"] == 0.5
    s = {r["pass"]: r for r in summarize(by_pass)}
    assert s["no_cache"]["check"] == "reference" and s["no_cache"]["speedup_vs_no_cache"] == 1.0
    assert s["blend_1"]["check"] == "identical to full prefill"
    assert s["blend_0"]["check"] == "pure reuse"   # recomputed = prompt - reused
    assert s["blend_0"]["speedup_vs_no_cache"] == pytest.approx(4.0)
    assert s["blend_0"]["identical_outputs"] == 0 and s["blend_1"]["identical_outputs"] == 1
    by_pass["blend_1"][0]["top1_token_ids"] = [1, 2, 3, 5]
    add_quality(by_pass)
    assert summarize(by_pass)[1]["check"] == "NOT identical to full prefill"


def test_blend_overrides_replace_what_cacheblend_sets():
    cfg = OmegaConf.create({"blend_special_str": " # # ", "blend_check_layers": [1],
                            "blend_recompute_ratios": [0.0, 0.15], "blend_min_tokens": 64})
    prefix = ["storage/backends=[local_cpu]", "token_database=chunked", "blend=none",
              "gpu_connector=vllm_paged", "chunk_size=256", "save_unfull_chunk=false",
              "token_database.hash_algorithm=sha256"]
    out = blend_overrides(prefix, cfg)
    assert out == ["storage/backends=[local_cpu]", "chunk_size=256", "blend=cacheblend",
                   "token_database.blend_special_str=' # # '", "blend.blend_check_layers=[1]",
                   "blend.blend_recompute_ratios=[0.0]", "blend.blend_min_tokens=64"]
