"""FP8Serde: fp8 (e4m3) KV with one float32 scale per (K/V, layer, head).

In the canonical view ``[K, L, T, D]`` (see :mod:`lmcache.serde.compressed`) with
``D = heads x head_size``: ``scale[k, l, h] = amax(|x[k, l, :, h]|) / 448`` (448 is e4m3's
largest finite value; an all-zero head gets scale 1), codes ``(x / scale).to(float8_e4m3fn)``
(round to nearest even), decoding ``code.float() * scale``. Error bound: e4m3 keeps 3 mantissa
bits, so ``|x - x'| <= |x| / 16 + scale * 2**-9`` per element (relative 2^-4 for normal
values, absolute half the smallest subnormal step near zero). Size: 1 byte per element plus
``4 K L H`` bytes: 2x smaller than bf16, 4x than float32.

KV that is already fp8 (``float8_e4m3fn`` or ``float8_e5m2``) passes through bit-exactly
(mode 1: the bytes as they are, no scales).

Body: ``mode u8 (0 scaled, 1 pass-through) | 3 pad | head_size u32`` then (mode 0) scales
float32 ``[K, L, H]`` and codes ``[K, L, T, D]`` (u8), or (mode 1) the raw bytes.
"""

from __future__ import annotations

import struct
from typing import Optional

import torch

from lmcache.serde.compressed import CompressingSerde

BODY = struct.Struct("<B3xI")
CODEC = 3
E4M3_MAX = 448.0
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def encode_fp8(x: torch.Tensor, head_size: int) -> bytes:
    """Body bytes of the canonical KV ``x`` ``[K, L, T, D]`` (any device).

    Raises:
        ValueError: ``head_size`` does not divide D.
    """
    kk, layers, tokens, dim = x.shape
    if x.dtype in FP8:
        return BODY.pack(1, head_size) + x.contiguous().view(torch.uint8).cpu().numpy().tobytes()
    if head_size < 1 or dim % head_size:
        raise ValueError(f"head_size={head_size} does not divide the KV width D={dim}")
    heads = dim // head_size
    g = x.float().reshape(kk, layers, tokens, heads, head_size)
    amax = g.abs().amax(dim=(2, 4))  # [K, L, H]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    codes = (g / scale[:, :, None, :, None]).to(torch.float8_e4m3fn)
    return (BODY.pack(0, head_size) + scale.contiguous().cpu().numpy().tobytes()
            + codes.view(torch.uint8).cpu().numpy().tobytes())


def decode_body(body, kk: int, layers: int, tokens: int, dim: int, device: str,
                dtype: torch.dtype) -> torch.Tensor:
    """Canonical KV ``[K, L, T, D]`` on ``device`` (float32, or ``dtype`` when fp8
    pass-through) from an fp8 body (a buffer, or a uint8 tensor, e.g. already on the GPU).

    Raises:
        ValueError: unknown mode, bad head size, or a body of the wrong length.
    """
    if isinstance(body, torch.Tensor):
        mode, head_size = BODY.unpack_from(bytes(body[:BODY.size].cpu().numpy()))
        raw = body[BODY.size:].to(device)
    else:
        mode, head_size = BODY.unpack_from(body)
        raw = torch.frombuffer(bytearray(body[BODY.size:]), dtype=torch.uint8).to(device)
    n = kk * layers * tokens * dim
    if mode == 1:
        if dtype not in FP8 or raw.numel() != n:
            raise ValueError(f"fp8 pass-through body of {raw.numel()} bytes for {n} {dtype}")
        return raw.view(dtype).view(kk, layers, tokens, dim)
    if mode != 0 or head_size < 1 or dim % head_size:
        raise ValueError(f"fp8 body with mode={mode}, head_size={head_size}, D={dim}")
    heads = dim // head_size
    nscale = kk * layers * heads
    if raw.numel() != 4 * nscale + n:
        raise ValueError(f"fp8 body is {raw.numel()} bytes, expected {4 * nscale + n}")
    scale = raw[:4 * nscale].view(torch.float32).view(kk, layers, 1, heads, 1)
    codes = raw[4 * nscale:].view(torch.float8_e4m3fn).view(kk, layers, tokens, heads, head_size)
    return (codes.float() * scale).view(kk, layers, tokens, dim)


class FP8Serde(CompressingSerde):
    """Serde option ``fp8``: e4m3 with per-(K/V, layer, head) scales; fp8 KV passes through.

    Args:
        metadata: the process's LMCacheMetadata (its ``head_size`` sets the scale groups);
            None → ``head_size``.
        head_size: channels per scale group when there is no metadata; 0 = the whole D.
        device: where quantization runs (``cpu``, ``cuda``, ``auto``).

    Raises:
        ValueError: negative head_size.
    """

    name = "fp8"
    codec = CODEC

    def __init__(self, metadata: Optional[object] = None, head_size: int = 0,
                 device: str = "cpu") -> None:
        super().__init__(device)
        if metadata is not None:
            head_size = int(metadata.kv_shape[4])
        if not isinstance(head_size, int) or head_size < 0:
            raise ValueError(f"head_size={head_size!r}: expected an int >= 0 (0 = whole D)")
        self.head_size = head_size

    def encode_body(self, x: torch.Tensor, dtype: torch.dtype) -> bytes:
        """fp8 body of canonical KV ``x`` (module doc)."""
        return encode_fp8(x, self.head_size or x.shape[-1])
