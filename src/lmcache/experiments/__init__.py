"""Experiments that run lmcache inside a real serving engine (Hydra apps and their helpers).

- :mod:`lmcache.experiments.long_doc_qa` — the long-document QA app: TTFT with and without
  lmcache, passes interleaved, repeats, medians and spread, lmcache's own cost per request.
- :mod:`lmcache.experiments.multi_round_qa` — users x rounds with a shared system prompt
  through an OpenAI server it starts (streamed TTFT, lmcache's metrics from ``/metrics``).
- :mod:`lmcache.experiments.rag_blend` — RAG with CacheBlend: documents in any subset and order,
  TTFT and quality (greedy agreement, NLL) of no cache / prefix-only / CacheBlend per ratio.
- :mod:`lmcache.experiments.lmcache_config` — lmcache's config tree inside an experiment's.
- :mod:`lmcache.experiments.runner` / :mod:`~lmcache.experiments.interleave` — engine processes
  and the measurement order; :mod:`~lmcache.experiments.serve` — the OpenAI server and client.
- :mod:`lmcache.experiments.report` / :mod:`~lmcache.experiments.console` /
  :mod:`~lmcache.experiments.sweep` — tables, CSV, log lines, combined sweeps.
- :mod:`lmcache.experiments.tiny_model` — a tiny random-weight Llama model + BPE tokenizer, built
  locally (no hub) for CPU runs.
"""
