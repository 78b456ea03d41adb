"""Real KV of a Hugging Face causal LM and the quality of text generated from a (lossy) copy.

The serde sweep (:mod:`lmcache.experiments.serde_sweep`) and ``scripts/bench_serde.py`` use
these helpers on the trained tiny Llama (:mod:`lmcache.experiments.trained_model`):

- :func:`prefill_kv`: the prompt's KV in LMCache's ``KV_2LTD`` layout ``[2, L, T, H*hd]``
  (float32 as computed, on the CPU).
- :func:`cache_from_kv`: a ``transformers.DynamicCache`` holding such a KV (no prefill).
- :func:`greedy_from_kv`, :func:`teacher_forced`: greedy tokens generated from a KV, and the
  NLL / top-1 agreement of reference tokens under it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def load_passages(tok, corpus: str | Path, count: int, tokens: int) -> list[torch.Tensor]:
    """``count`` prompts of ``tokens`` + 1 token ids (int64, CPU): the first ``tokens`` + 1 of
    each corpus file (sorted by name) that has that many; the last id is the token fed after
    the cached prefix.

    Raises:
        ValueError: the corpus has fewer than ``count`` files that long.
    """
    from lmcache.experiments.tiny_model import corpus_files

    out = []
    for path in corpus_files(corpus):
        ids = tok(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
        if len(ids) > tokens:
            out.append(torch.tensor(ids[: tokens + 1]))
        if len(out) == count:
            return out
    raise ValueError(f"corpus {str(corpus)!r} has {len(out)} files of more than {tokens} "
                     f"tokens; {count} needed (lower documents.count or documents.tokens)")


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(lay.keys, lay.values) for lay in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def to_kv_2ltd(layers) -> torch.Tensor:
    """Per-layer HF ``(k, v)`` of shape ``[1, H, T, hd]`` -> ``[2, L, T, H*hd]``."""
    ks = torch.stack([k[0].permute(1, 0, 2).flatten(1) for k, _ in layers])
    vs = torch.stack([v[0].permute(1, 0, 2).flatten(1) for _, v in layers])
    return torch.stack([ks, vs])


def prefill_kv(model, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(KV of ``ids[:-1]`` as ``[2, L, T, H*hd]`` float32 on the CPU, seconds of the full
    prefill of ``ids`` up to the first token's logits: the recompute TTFT)."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    cache = DynamicCache()
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids[None].to(dev), use_cache=False).logits[0, -1].argmax()
        ttft = time.perf_counter() - t0
        model(ids[None, :-1].to(dev), past_key_values=cache, use_cache=True)
    return to_kv_2ltd(_layers(cache)).float().cpu(), ttft


def cache_from_kv(model, kv: torch.Tensor):
    """A ``DynamicCache`` holding ``kv`` ``[2, L, T, H*hd]`` (any float dtype, any device),
    converted to the model's dtype and device."""
    from transformers import DynamicCache

    param = next(model.parameters())
    heads = model.config.num_key_value_heads
    cache = DynamicCache()
    tokens = kv.shape[2]
    for layer in range(kv.shape[1]):
        k, v = (kv[i, layer].view(tokens, heads, -1).permute(1, 0, 2)[None]
                .to(param.device, param.dtype).contiguous() for i in (0, 1))
        cache.update(k, v, layer)
    return cache


def greedy_from_kv(model, kv: torch.Tensor, last_id: int, n: int) -> list[int]:
    """``n`` greedy token ids generated after the cached prefix ``kv`` and ``last_id``."""
    dev = next(model.parameters()).device
    cache, nxt, out = cache_from_kv(model, kv), torch.tensor([last_id], device=dev), []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(nxt[None], past_key_values=cache, use_cache=True).logits[0, -1].argmax()
            nxt = nxt.view(1)
            out.append(int(nxt))
    return out


def teacher_forced(model, kv: torch.Tensor, last_id: int, ref: list[int]) -> tuple[float, float]:
    """(mean NLL in nats/token, share of positions whose argmax is the reference token) of
    ``ref`` fed after the cached prefix ``kv`` and ``last_id``."""
    dev = next(model.parameters()).device
    inp = torch.tensor([last_id] + ref[:-1], device=dev)[None]
    with torch.no_grad():
        logits = model(inp, past_key_values=cache_from_kv(model, kv), use_cache=True)
        logits = logits.logits[0].float()
    target = torch.tensor(ref, device=dev)
    nll = float(torch.nn.functional.cross_entropy(logits, target))
    return nll, float((logits.argmax(-1) == target).float().mean())


def agreement(tokens: list[int], ref: list[int]) -> float:
    """Share of positions where ``tokens`` equals ``ref`` (0..1; lengths must match)."""
    if len(tokens) != len(ref) or not ref:
        raise ValueError(f"agreement of {len(tokens)} tokens against {len(ref)}: expected "
                         "equal lengths > 0")
    return sum(a == b for a, b in zip(tokens, ref)) / len(ref)
