"""Token selection of CacheBlend: which tokens a blend recomputes after its check layer.

LMCache's ``LMCBlender.process_qkv`` at a ``blend_check_layers`` layer: the deviation of each
token is ``sum((k_fresh - k_cached)**2)`` over its K channels (float32), and the tokens with the
``int(ratio * n)`` largest deviations are recomputed in the later layers, in position order.
Here ``n`` counts only tokens that have a cache, and tokens without one (separators, new text:
LMCache's zeroed gaps) are always recomputed; LMCache's minimum of one token is dropped, so that
ratio 0 is pure reuse.
"""

from __future__ import annotations

import math

import torch


def num_recomputed(num_cached: int, ratio: float) -> int:
    """How many of ``num_cached`` cached tokens a ``ratio`` recomputes: ``floor(ratio * n)``
    (with a 1e-9 slack so that e.g. 0.29 * 100 gives 29, not 28).

    Raises:
        ValueError: ``ratio`` outside [0, 1] or not a number; negative ``num_cached``.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"blend recompute ratio must be a number in [0, 1], got {ratio!r}")
    if num_cached < 0:
        raise ValueError(f"num_cached must be >= 0, got {num_cached}")
    return min(num_cached, math.floor(ratio * num_cached + 1e-9))


def k_deviation(k_fresh: torch.Tensor, k_cached: torch.Tensor) -> torch.Tensor:
    """Per-token squared L2 distance ``[T]`` (float32) between ``[T, kv_size]`` K tensors."""
    if k_fresh.shape != k_cached.shape:
        raise ValueError(f"fresh K {tuple(k_fresh.shape)} and cached K "
                         f"{tuple(k_cached.shape)} differ in shape")
    diff = k_fresh.to(torch.float32) - k_cached.to(device=k_fresh.device, dtype=torch.float32)
    return (diff * diff).sum(dim=-1)


def select_recompute_tokens(deviation: torch.Tensor, uncached: torch.Tensor,
                            ratio: float) -> torch.Tensor:
    """Indices (int64, ascending, on ``deviation.device``) of the tokens to recompute.

    Args:
        deviation: float ``[T]``, e.g. :func:`k_deviation`.
        uncached: bool ``[T]``, True = the token has no cached K/V (always selected).
        ratio: fraction of the cached tokens to select, by largest deviation (ties: lowest
            index first, as ``torch.topk`` is not stable this sorts explicitly).

    Raises:
        ValueError: shapes that differ or are not 1-D, a non-bool mask, a bad ratio.
    """
    if deviation.dim() != 1 or uncached.shape != deviation.shape or uncached.dtype != torch.bool:
        raise ValueError(f"deviation [T] and a bool uncached mask [T] expected, got "
                         f"{tuple(deviation.shape)} and {tuple(uncached.shape)} {uncached.dtype}")
    uncached = uncached.to(deviation.device)
    cached_idx = torch.nonzero(~uncached).flatten()
    k = num_recomputed(int(cached_idx.numel()), ratio)
    order = torch.sort(deviation[cached_idx].float(), descending=True, stable=True).indices
    chosen = torch.cat([torch.nonzero(uncached).flatten(), cached_idx[order[:k]]])
    return torch.sort(chosen).values
