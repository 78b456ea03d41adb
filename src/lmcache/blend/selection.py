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
from collections.abc import Sequence
from typing import Union

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


def check_layers(blend_check_layers: Union[int, Sequence[int]], num_layers: int) -> list[int]:
    """``blend_check_layers`` (an int or LMCache's list) as a list, checked.

    Raises:
        ValueError: not an int or a sequence of ints, empty, not strictly increasing, or a
            layer outside ``[0, num_layers)`` (the value and the range are named).
    """
    if isinstance(blend_check_layers, bool) or not isinstance(blend_check_layers,
                                                                 (int, Sequence)) \
            or isinstance(blend_check_layers, str):
        raise ValueError(f"blend_check_layers must be a layer index or a list of them, got "
                         f"{blend_check_layers!r}")
    layers = [blend_check_layers] if isinstance(blend_check_layers, int) else list(
        blend_check_layers)
    if not layers:
        raise ValueError("blend_check_layers is empty: name at least one layer (LMCache's "
                         "default is [1])")
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int)]
    if bad:
        raise ValueError(f"blend_check_layers must hold ints, got {bad[0]!r} in {layers}")
    outside = [x for x in layers if not 0 <= x < num_layers]
    if outside:
        raise ValueError(f"blend_check_layers={layers}: layer {outside[0]} is outside the "
                         f"model's layers 0..{num_layers - 1}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"blend_check_layers={layers} must be strictly increasing (sorted, "
                         "no repeats)")
    return layers


def check_ratios(blend_recompute_ratios: Union[float, Sequence[float]],
                 num_check_layers: int) -> list[float]:
    """``blend_recompute_ratios`` as one float per check layer (one value is used at every
    check layer, as LMCache uses its first).

    Raises:
        ValueError: empty, a length other than 1 or ``num_check_layers``, or a ratio outside
            [0, 1] (named).
    """
    if isinstance(blend_recompute_ratios, (int, float)) and not isinstance(
            blend_recompute_ratios, bool):
        ratios = [blend_recompute_ratios]
    elif isinstance(blend_recompute_ratios, Sequence) and not isinstance(
            blend_recompute_ratios, str):
        ratios = list(blend_recompute_ratios)
    else:
        raise ValueError(f"blend_recompute_ratios must be a number or a list of numbers, got "
                         f"{blend_recompute_ratios!r}")
    if len(ratios) not in (1, num_check_layers):
        raise ValueError(f"blend_recompute_ratios={ratios} must hold one ratio, or one per "
                         f"check layer ({num_check_layers})")
    for r in ratios:
        num_recomputed(0, r)  # validates
    return [float(r) for r in ratios] * (num_check_layers if len(ratios) == 1 else 1)
