"""The vLLM engines of the RAG blend experiment (one child process each, see
:mod:`lmcache.experiments.runner`; built there from ``job["engine"]``).

Three engines serve the passes:

* ``no_cache`` — plain vLLM (no KV connector, vLLM's prefix caching off): the reference.
* ``prefix_only`` — lmcache as composed by the experiment's config (chunked prefix keys).
* ``cacheblend`` — lmcache with ``blend=cacheblend``; one engine serves every recompute ratio:
  each ratio's pass has its own ``cache_salt`` (lmcache puts it into every segment key, so the
  passes never see each other's cache) and the runner's ratio is set before each request
  (:attr:`CacheBlendRunner.ratio`).

At start every engine runs an unrelated warm-up prompt; every pass of an lmcache engine then
runs the warm prompts (each document alone, as CacheBlend users fill the cache) and one
unmeasured query (so the first measured request does not pay for first-use costs).

A request is greedy, ``max_tokens`` long (``ignore_eos``), with ``logprobs=1``; with
``forced`` token ids it is teacher-forced (:mod:`lmcache.experiments.rag_blend_forced`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from lmcache.experiments.runner import ENGINE_ENV

ENGINE = "lmcache.experiments.rag_blend_engine:RagPassEngine"


def _blend_runner():
    """The CacheBlendRunner of this process's lmcache connector, or None (no blend)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    from lmcache.integration.vllm.blend_worker import BlendConnectorWorker

    if not has_kv_transfer_group():
        return None
    impl = getattr(get_kv_transfer_group(), "_impl", None)
    worker = getattr(impl, "worker", None)
    return worker.runner if isinstance(worker, BlendConnectorWorker) else None


class RagPassEngine:
    """One engine and the passes it serves (module docstring).

    ``job`` keys: ``name``, ``model``, ``llm`` (``vllm.LLM`` kwargs), ``kv_transfer`` (dict of
    ``KVTransferConfig`` fields or None), ``max_tokens``, ``warmup_tokens``, ``passes``
    (``{pass name: {"salt": str | None, "ratio": float | None}}``), ``warm_prompts`` (token id
    lists run once per pass before measuring; lmcache engines only), ``warm_query`` (one token
    id list run once per pass after them, or None).

    Raises:
        ValueError: a pass with a ratio on an engine without CacheBlend.
    """

    def __init__(self, job: dict[str, Any]) -> None:
        os.environ.update(ENGINE_ENV)
        from vllm import LLM
        from vllm.config import KVTransferConfig

        from lmcache.experiments.rag_blend_forced import FORCED_TOKENS_PROCESSOR

        t0 = time.perf_counter()
        kwargs = dict(job["llm"])
        kwargs["logits_processors"] = [FORCED_TOKENS_PROCESSOR]
        if job.get("kv_transfer"):
            kwargs["kv_transfer_config"] = KVTransferConfig(**job["kv_transfer"])
        self.llm = LLM(model=job["model"], tokenizer=job["model"], **kwargs)
        self.max_tokens = int(job["max_tokens"])
        self.passes = dict(job["passes"])
        self.runner = _blend_runner()
        if self.runner is None and any(p.get("ratio") is not None for p in self.passes.values()):
            raise ValueError(f"engine {job['name']!r}: a blend ratio was given but its lmcache "
                             "has no CacheBlend runner (blend=cacheblend)")
        if int(job.get("warmup_tokens", 0)) > 0:
            vocab = len(self.llm.get_tokenizer())
            warm = [3 + (i * 7919) % (vocab - 3) for i in range(int(job["warmup_tokens"]))]
            self._generate(warm, None, None, 1)
        if job.get("kv_transfer"):
            for name in self.passes:
                for ids in job.get("warm_prompts") or ():
                    self._generate(list(ids), name, None, 1)
                if job.get("warm_query"):
                    self._generate(list(job["warm_query"]), name, None, 1)
        self.startup_s = time.perf_counter() - t0

    def _generate(self, ids: list[int], pass_name: Optional[str], forced: Optional[list[int]],
                  max_tokens: int):
        from vllm import SamplingParams

        spec = self.passes.get(pass_name, {}) if pass_name else {}
        if self.runner is not None and spec.get("ratio") is not None:
            self.runner.ratio = float(spec["ratio"])
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if spec.get("salt"):
            prompt["cache_salt"] = str(spec["salt"])
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                logprobs=1,
                                extra_args={"forced_token_ids": list(forced)} if forced else None)
        return self.llm.generate([prompt], params, use_tqdm=False)[0]

    def _counters(self) -> tuple[int, int, int]:
        r = self.runner
        return (0, 0, 0) if r is None else (r.blended_requests, r.reused_tokens,
                                            r.recomputed_tokens)

    def run(self, req: dict[str, Any]) -> dict[str, Any]:
        """Run one request: keys ``pass`` (one of the job's passes), ``prompt_token_ids``,
        ``forced`` (token ids to force, or None: free greedy) and any others (copied).

        Returns the request's fields (without the prompt and ``forced``) plus
        ``prompt_tokens``, ``ttft_s``, ``prefill_s`` (s), ``hit_tokens`` (vLLM's
        ``num_cached_tokens``: tokens the connector supplied), ``reused_tokens`` (tokens whose
        cached KV was reused: the hits, or with CacheBlend the cached segments' tokens),
        ``recomputed_tokens`` (tokens whose KV was computed: prompt - hits, or with CacheBlend
        the tokens recomputed after the check layer + the last one), ``blended`` (bool),
        ``output_token_ids``, ``token_logprobs`` (raw logprob of each output token) and
        ``top1_token_ids`` (the greedy choice at each step).

        Raises:
            KeyError: an unknown pass.  RuntimeError: vLLM returned no metrics, or a forced
            output that differs from ``forced``.
        """
        from lmcache.experiments.rag_blend_forced import step_scores

        name = str(req["pass"])
        if name not in self.passes:
            raise KeyError(f"pass {name!r} is not served by this engine ({list(self.passes)})")
        forced = req.get("forced")
        before = self._counters()
        out = self._generate(list(req["prompt_token_ids"]), name, forced, self.max_tokens)
        after = self._counters()
        m = out.metrics
        if m is None:
            raise RuntimeError(f"vLLM returned no metrics for {req.get('request_key')}: pass "
                               "disable_log_stats=False to vllm.LLM")
        completion = out.outputs[0]
        tokens = [int(t) for t in completion.token_ids]
        if forced and tokens != list(forced)[:len(tokens)]:
            raise RuntimeError(f"forced decoding of {req.get('request_key')} in pass {name} "
                               f"produced {tokens[:8]}..., expected {list(forced)[:8]}...")
        logprobs, top1 = step_scores(completion)
        n = len(req["prompt_token_ids"])
        hits = int(out.num_cached_tokens or 0)
        blended = after[0] > before[0]
        row = {k: v for k, v in req.items() if k not in ("prompt_token_ids", "forced")}
        row.update(
            prompt_tokens=n, ttft_s=float(m.first_token_latency),
            prefill_s=float(m.first_token_ts - m.scheduled_ts), hit_tokens=hits,
            reused_tokens=(after[1] - before[1]) if blended else hits,
            recomputed_tokens=(after[2] - before[2] + n - hits) if blended else n - hits,
            blended=blended, output_token_ids=tokens, token_logprobs=logprobs,
            top1_token_ids=top1)
        return row
