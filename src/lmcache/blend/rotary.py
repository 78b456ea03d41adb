"""RoPE re-positioning of cached K (LMCache's ``fused_rotary_emb``): torch path + CUDA kernel.

Rotary position embedding turns a key at position ``p`` into ``R(p·f) k`` (a rotation of each
pair of channels by the angle ``p·f_i``). A segment's K cached at positions ``old`` is moved to
``new`` by the rotation ``R(new·f − old·f)`` — no recompute needed. This module does that for
the RoPE variants of vLLM's ``get_rope`` whose frequencies do not depend on the sequence:
``default``, ``linear`` and ``llama3``, in neox (halves) and gptj (interleaved) styles, with a
partial ``rotary_dim``. Others (``dynamic``/``ntk``/``yarn``/``longrope``/MRoPE, ...) are refused
with an error naming them, never run with silently wrong positions.

The angle of each position is computed in float32 exactly as vLLM builds its ``cos_sin_cache``
(``position·inv_freq``, linear scaling ``(position/factor)·inv_freq``), and the difference
``new − old`` of the two float32 angles is taken in float64, so re-positioned K matches K that
vLLM computes at ``new`` up to the rounding of one rotation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_UNSUPPORTED_KEYS = ("mrope_section", "use_fope")


class FusedRotaryEmb:
    """Rotates K from the positions it was computed at to new positions (in place).

    Args:
        head_size: channels per head (> 0).
        rotary_dim: leading channels of each head that RoPE rotates (even, <= head_size);
            None = head_size. The rest pass through unchanged, as in vLLM.
        base: ``rope_theta``.
        is_neox_style: True = rotate halves (neox, Llama/Qwen), False = interleaved pairs (gptj).
        rope_type: ``"default"``, ``"linear"`` or ``"llama3"``.
        factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: scaling
            parameters of ``linear`` (factor) and ``llama3`` (all four), as in HF/vLLM configs.
        use_cuda_kernel: on CUDA, rotate float32/bfloat16 K with ``csrc/rotary_k.cu``
            (:mod:`lmcache.blend.rotary_cuda`, bit-identical to the torch path) when CuPy is
            there; otherwise (CPU, float16, no CuPy, non-contiguous heads) the torch path runs.

    Raises:
        ValueError: bad sizes, an unsupported ``rope_type`` (named), or missing/bad scaling
            parameters.
    """

    def __init__(self, head_size: int, rotary_dim: Optional[int] = None, base: float = 10000.0,
                 is_neox_style: bool = True, rope_type: str = "default",
                 factor: Optional[float] = None, low_freq_factor: Optional[float] = None,
                 high_freq_factor: Optional[float] = None,
                 original_max_position_embeddings: Optional[int] = None,
                 use_cuda_kernel: bool = True) -> None:
        if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size <= 0:
            raise ValueError(f"head_size must be a positive int, got {head_size!r}")
        rotary_dim = head_size if rotary_dim is None else rotary_dim
        if (isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim <= 0
                or rotary_dim % 2 or rotary_dim > head_size):
            raise ValueError(f"rotary_dim must be an even int in [2, head_size={head_size}], "
                             f"got {rotary_dim!r}")
        if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 0:
            raise ValueError(f"rope base (rope_theta) must be a positive number, got {base!r}")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"RoPE type {rope_type!r} cannot be re-positioned (its frequencies depend on the "
                f"sequence or it is not a plain rotation); supported: {SUPPORTED_ROPE_TYPES}")
        self.head_size, self.rotary_dim, self.base = head_size, rotary_dim, float(base)
        self.is_neox_style, self.rope_type = bool(is_neox_style), rope_type
        self.use_cuda_kernel = bool(use_cuda_kernel)
        self.position_scale = 1.0
        inv_freq = 1.0 / (self.base ** (
            torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        if rope_type == "linear":
            self.position_scale = _positive("factor", factor, rope_type)
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(
                inv_freq, _positive("factor", factor, rope_type),
                _positive("low_freq_factor", low_freq_factor, rope_type),
                _positive("high_freq_factor", high_freq_factor, rope_type),
                _positive("original_max_position_embeddings", original_max_position_embeddings,
                          rope_type))
        self.inv_freq = inv_freq  # float32 [rotary_dim // 2], CPU

    @classmethod
    def from_rope_parameters(cls, head_size: int, rope_parameters: Optional[Mapping[str, Any]],
                             is_neox_style: bool = True,
                             use_cuda_kernel: bool = True) -> "FusedRotaryEmb":
        """Built from a model's ``rope_parameters`` as vLLM's ``get_rope`` reads them
        (``rope_theta``, ``rope_type`` or legacy ``type``, ``rope_dim`` or
        ``partial_rotary_factor``, and the scaling keys).

        Raises:
            ValueError: an unsupported type or MRoPE/FoPE parameters (named), a bad
                partial_rotary_factor.
        """
        params = dict(rope_parameters or {})
        for key in _UNSUPPORTED_KEYS:
            if params.get(key):
                raise ValueError(f"RoPE with {key}={params[key]!r} cannot be re-positioned")
        rope_type = params.get("rope_type", params.get("type", "default"))
        rotary_dim = params.get("rope_dim")
        if not rotary_dim:
            prf = params.get("partial_rotary_factor", 1.0)
            if not 0.0 < prf <= 1.0:
                raise ValueError(f"partial_rotary_factor={prf!r} must be in (0, 1]")
            rotary_dim = int(head_size * prf)
        return cls(head_size, rotary_dim, params.get("rope_theta", 10000.0), is_neox_style,
                   rope_type, factor=params.get("factor"),
                   low_freq_factor=params.get("low_freq_factor"),
                   high_freq_factor=params.get("high_freq_factor"),
                   original_max_position_embeddings=params.get(
                       "original_max_position_embeddings"), use_cuda_kernel=use_cuda_kernel)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """float32 angles ``[num_tokens, rotary_dim // 2]`` of ``positions`` as vLLM's
        cos_sin_cache holds them (on ``positions.device``)."""
        t = positions.to(torch.float32)
        if self.position_scale != 1.0:
            t = t / self.position_scale
        return t[:, None] * self.inv_freq.to(positions.device)[None, :]

    def rotation(self, old_positions: torch.Tensor, new_positions: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)``, each ``[num_tokens, rotary_dim // 2]`` on ``device``, of the
        rotation from ``old_positions`` to ``new_positions`` (the difference of the two float32
        angles taken in float64). A blend computes it once per request and applies it to every
        layer's K with :meth:`rotate` (the positions are the same in every layer)."""
        dev = torch.device(device)
        delta = (self.angles(new_positions.to(dev)).double()
                 - self.angles(old_positions.to(dev)).double())
        return delta.cos().float(), delta.sin().float()

    def __call__(self, old_positions: torch.Tensor, new_positions: torch.Tensor,
                 k: torch.Tensor) -> torch.Tensor:
        """Re-position ``k`` from ``old_positions`` to ``new_positions``, in place.

        Args:
            old_positions, new_positions: 1-D integer tensors of ``num_tokens`` positions
                (any device; moved to ``k``'s).
            k: ``[num_tokens, num_heads * head_size]`` or ``[num_tokens, num_heads,
                head_size]``, float16/bfloat16/float32, any device; rotated in float32 and
                written back in its dtype.

        Returns:
            ``k`` (the same tensor, now at ``new_positions``).

        Raises:
            ValueError: shapes that do not match (named), non-integer positions, a
                non-floating k.
        """
        n = k.shape[0] if k.dim() else 0
        for name, pos in (("old_positions", old_positions), ("new_positions", new_positions)):
            if not isinstance(pos, torch.Tensor) or pos.dim() != 1 or pos.numel() != n:
                raise ValueError(f"{name} must be a 1-D tensor of {n} positions (k has shape "
                                 f"{tuple(k.shape)}), got {getattr(pos, 'shape', pos)!r}")
            if pos.dtype.is_floating_point or pos.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got {pos.dtype}")
        if not k.dtype.is_floating_point:
            raise ValueError(f"k must be a floating tensor, got {k.dtype}")
        if k.dim() not in (2, 3) or k.shape[-1] % self.head_size or (
                k.dim() == 3 and k.shape[-1] != self.head_size):
            raise ValueError(f"k must be [num_tokens, num_heads*{self.head_size}] or "
                             f"[num_tokens, num_heads, {self.head_size}], got {tuple(k.shape)}")
        if n == 0:
            return k
        return self.rotate(k, *self.rotation(old_positions, new_positions, k.device))

    def rotate(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply a :meth:`rotation` ``(cos, sin)`` of ``k.shape[0]`` tokens to ``k`` in place
        (``k`` as for :meth:`__call__`, already checked there or by the caller); returns ``k``.

        Raises:
            ValueError: ``cos``/``sin`` not ``[num_tokens, rotary_dim // 2]``.
        """
        n = k.shape[0]
        half = self.rotary_dim // 2
        if tuple(cos.shape) != (n, half) or tuple(sin.shape) != (n, half):
            raise ValueError(f"cos/sin must be [{n}, {half}], got {tuple(cos.shape)} and "
                             f"{tuple(sin.shape)}")
        if self.use_cuda_kernel and k.is_cuda:
            from lmcache.blend.rotary_cuda import cuda_kernel_usable, rotate_k_cuda

            if cuda_kernel_usable(k):
                rotate_k_cuda(k, cos, sin, self.head_size, self.rotary_dim, self.is_neox_style)
                return k
        cos, sin = cos[:, None, :], sin[:, None, :]
        heads = k.view(n, -1, self.head_size)
        rot = heads[..., :self.rotary_dim].float()
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., ::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        heads[..., :self.rotary_dim] = out.to(k.dtype)
        return k


def _positive(name: str, value: Any, rope_type: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"RoPE type {rope_type!r} needs a positive {name}, got {value!r}")
    return value


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low: float, high: float,
                     orig_max: float) -> torch.Tensor:
    """Llama 3's frequency scaling, with vLLM's ``Llama3RotaryEmbedding`` operations."""
    low_wavelen, high_wavelen = orig_max / low, orig_max / high
    wave_len = 2 * math.pi / inv_freq
    smooth = (orig_max / wave_len - low) / (high - low) if low != high else 0
    return torch.where(
        wave_len < high_wavelen, inv_freq,
        torch.where(wave_len > low_wavelen, inv_freq / factor,
                    (1 - smooth) * inv_freq / factor + smooth * inv_freq))
