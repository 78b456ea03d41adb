"""Experiments that run lmcache inside a real serving engine (Hydra apps and their helpers).

- :mod:`lmcache.experiments.tiny_model` — a tiny random-weight Llama model + BPE tokenizer, built
  locally (no hub) for CPU runs.
- :mod:`lmcache.experiments.long_doc_qa` — the long-document QA app: TTFT with and without lmcache.
"""
