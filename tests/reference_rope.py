"""An independent neox RoPE in float64, the reference the CacheBlend tests compare K against.

Importable as ``reference_rope`` from any test: ``tests/`` is on ``sys.path`` because the
rootdir ``tests/conftest.py`` puts it there (pytest's default ``prepend`` import mode).
"""

from __future__ import annotations

import torch


def rope_at(raw: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """``raw`` (pre-RoPE K, [T, H, D], any float dtype, CPU) rotated to ``positions`` ([T] ints)
    with neox RoPE of base ``theta``, computed in float64; returns float32 [T, H, D]."""
    d = raw.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = raw.double().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).float()
