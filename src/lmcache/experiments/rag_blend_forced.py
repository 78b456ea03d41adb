"""Teacher-forced decoding inside vLLM: score a given output under a pass's own KV cache.

The RAG blend experiment measures the quality of a pass (prefix-only lmcache, CacheBlend at a
recompute ratio) by the negative log-likelihood of the no-cache pass's greedy output under that
pass's KV. vLLM's ``prompt_logprobs`` cannot give it: a request that asks for prompt logprobs
skips every cached token, the KV connector's included (vLLM 0.32,
``Request.skip_reading_prefix_cache`` and ``Scheduler.schedule``). So the output is *decoded*
instead, with every generated token forced:

* :class:`ForcedTokensLogitsProcessor` (a vLLM v1 logits processor, loaded by its name
  :data:`FORCED_TOKENS_PROCESSOR` through ``vllm.LLM(logits_processors=[...])``) keeps, at
  generation step ``t`` of a request whose ``SamplingParams.extra_args["forced_token_ids"]`` is
  a list, only token ``forced[t]`` (every other logit ``-inf``); requests without that key are
  untouched.
* vLLM's sampler computes the returned logprobs from the *raw* logits, before any logits
  processor (``logprobs_mode="raw_logprobs"``, vLLM's default; vllm/v1/sample/sampler.py). With
  ``SamplingParams(logprobs=1)`` each step therefore reports the forced token's log-probability
  under the model and the pass's cache, and the rank-1 token: what greedy decoding would have
  chosen after the same prefix (teacher-forced greedy agreement).

The first forced token is scored by the prefill's last position (the blended KV of the prompt),
every later one by a decode step over that KV: the output's likelihood under the pass's cache.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

#: ``<module>:<class>`` name of :class:`ForcedTokensLogitsProcessor` for ``vllm.LLM``.
FORCED_TOKENS_PROCESSOR = "lmcache.experiments.rag_blend_forced:ForcedTokensLogitsProcessor"
#: the ``SamplingParams.extra_args`` key holding a request's forced token ids.
FORCED_KEY = "forced_token_ids"


def forced_tokens(params: SamplingParams) -> Optional[list[int]]:
    """The forced token ids of a request (``extra_args[FORCED_KEY]``), or None.

    Raises:
        ValueError: the value is not a list of non-negative ints (named).
    """
    extra = params.extra_args or {}
    forced = extra.get(FORCED_KEY)
    if forced is None:
        return None
    if not isinstance(forced, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in forced):
        raise ValueError(f"extra_args[{FORCED_KEY!r}] must be a list of token ids >= 0, got "
                         f"{forced!r:.80}")
    return [int(t) for t in forced]


class ForcedTokensLogitsProcessor(AdapterLogitsProcessor):
    """At step ``t`` of a forced request, every logit but ``forced[t]``'s becomes ``-inf``
    (steps past the list are left alone). Not argmax-invariant: vLLM applies it to greedy
    requests too."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        forced_tokens(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(
            self, params: SamplingParams) -> Optional[Callable[[list[int], torch.Tensor],
                                                               torch.Tensor]]:
        forced = forced_tokens(params)
        if not forced:
            return None

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            step = len(output_ids)
            if step < len(forced):
                token = forced[step]
                logits.fill_(float("-inf"))
                logits[token] = 0.0
            return logits

        return force


def step_scores(completion: Any) -> tuple[list[float], list[int]]:
    """``(logprobs, top1)`` of one vLLM ``CompletionOutput`` generated with ``logprobs >= 1``:
    per generated token, its raw log-probability (natural log) and the rank-1 token id.

    Raises:
        RuntimeError: the completion carries no logprobs (``SamplingParams.logprobs`` unset).
    """
    if completion.logprobs is None:
        raise RuntimeError("the completion has no logprobs: pass SamplingParams(logprobs=1)")
    logprobs, top1 = [], []
    for token, step in zip(completion.token_ids, completion.logprobs):
        logprobs.append(float(step[token].logprob))
        top1.append(int(min(step.items(), key=lambda kv: kv[1].rank)[0]))
    return logprobs, top1
