"""KIVISerde: 2-bit asymmetric quantization, keys per channel and values per token (KIVI).

KIVI (Liu et al., ICML'24) quantizes keys per channel (outlier channels keep their own range)
and values per token. Here, in the canonical view ``[K, L, T, D]`` (see
:mod:`lmcache.serde.compressed`):

- keys (K index 0, also the MLA latent): groups of ``group_size`` tokens of one channel share
  one fp16 (scale, zero point); the token count is padded to a multiple of ``group_size``
  by repeating the last token;
- values (K index 1): groups of ``group_size`` channels of one token share one pair; D is
  padded the same way;
- each element becomes ``q = clamp(round((x - zero) / scale), 0, 2^bits - 1)``, packed
  ``8 / bits`` to a byte (lowest bits first); decoding is ``q * scale + zero``.

Error bound (what the tests check): ``|x - x'| <= scale / 2`` per element, plus the fp16
rounding of scale and zero point (``scale = (max - min) / (2^bits - 1)`` of its group).
Size: ``bits + 32 / group_size`` bits per element (2-bit, group 32: 3 bits, 5.3x smaller than
bf16; group 64: 6.4x; group 128: 7.1x).

Body: ``group_size u16 | bits u8 | 0 u8`` then, for keys and values in turn, packed codes
(u8), scales (fp16), zero points (fp16).
"""

from __future__ import annotations

import struct

import torch

from lmcache.serde.compressed import CompressingSerde

BODY = struct.Struct("<HBx")
CODEC = 2


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    n = x.shape[dim]
    extra = (-n) % multiple
    if not extra:
        return x
    edge = x.narrow(dim, n - 1, 1)
    return torch.cat([x] + [edge] * extra, dim=dim)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits, numel a multiple of 8 // bits) into bytes, low bits first."""
    per = 8 // bits
    q = q.reshape(-1, per)
    out = q[:, 0].clone()
    for i in range(1, per):
        out |= q[:, i] << (bits * i)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as uint8."""
    per = 8 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & mask).reshape(-1)[:n]


def _quantize(g: torch.Tensor, bits: int):
    """Group on the last dim of ``g`` (float32) -> (codes uint8, scale fp16, zero fp16)."""
    levels = (1 << bits) - 1
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    zero = lo.clamp(-65504, 65504).half()
    scale = ((hi - zero.float()) / levels).clamp(max=65504).half()
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((g - zero.float()) / safe).clamp_(0, levels).to(torch.uint8)
    return q, scale, zero


def _groups(x: torch.Tensor, is_key: bool, group: int) -> torch.Tensor:
    """[L, T, D] -> groups on the last dim: keys [L, D, T/g, g], values [L, T, D/g, g]."""
    if is_key:
        x = _pad_to(x, 1, group).transpose(1, 2)
    else:
        x = _pad_to(x, 2, group)
    return x.reshape(x.shape[0], x.shape[1], -1, group)


def encode_kivi(x: torch.Tensor, group_size: int = 32, bits: int = 2) -> bytes:
    """Body bytes of the canonical KV ``x`` ``[K, L, T, D]`` (any float dtype and device)."""
    parts = [BODY.pack(group_size, bits)]
    for k in range(x.shape[0]):
        g = _groups(x[k].float(), k == 0, group_size)
        q, scale, zero = _quantize(g, bits)
        parts += [pack_bits(q.reshape(-1), bits), scale.reshape(-1), zero.reshape(-1)]
    return parts[0] + b"".join(
        p.contiguous().view(torch.uint8).cpu().numpy().tobytes() for p in parts[1:])


def decode_body(body: memoryview, kk: int, layers: int, tokens: int, dim: int, device: str,
                dtype: torch.dtype) -> torch.Tensor:
    """Canonical KV ``[K, L, T, D]`` (float32, on ``device``) from a KIVI body (a buffer, or
    a uint8 tensor, e.g. already on the GPU).

    Raises:
        ValueError: bad group size / bits, or a body of the wrong length.
    """
    head = bytes(body[:BODY.size].cpu().numpy()) if isinstance(body, torch.Tensor) else body
    group, bits, = BODY.unpack_from(head)
    if bits not in (1, 2, 4, 8) or group < 1:
        raise ValueError(f"KIVI body with bits={bits}, group_size={group}")
    raw = (body[BODY.size:].to(device) if isinstance(body, torch.Tensor)  # device-resident
           else torch.frombuffer(bytearray(body[BODY.size:]), dtype=torch.uint8).to(device))
    out = torch.empty((kk, layers, tokens, dim), dtype=torch.float32, device=device)
    pos = 0
    for k in range(kk):
        t_pad = tokens + (-tokens) % group if k == 0 else tokens
        d_pad = dim + (-dim) % group if k != 0 else dim
        n = layers * t_pad * d_pad
        ngroups = n // group
        nbytes = -(-n * bits // 8)
        need = nbytes + 4 * ngroups
        if raw.numel() < pos + need:
            raise ValueError(f"KIVI body is {raw.numel()} bytes, needs at least {pos + need}")
        q = unpack_bits(raw[pos:pos + nbytes], bits, n).float()
        pos += nbytes
        scale = raw[pos:pos + 2 * ngroups].view(torch.float16).float()
        pos += 2 * ngroups
        zero = raw[pos:pos + 2 * ngroups].view(torch.float16).float()
        pos += 2 * ngroups
        vals = (q.view(ngroups, group) * scale[:, None] + zero[:, None])
        if k == 0:
            vals = vals.view(layers, dim, t_pad).transpose(1, 2)[:, :tokens]
        else:
            vals = vals.view(layers, tokens, d_pad)[:, :, :dim]
        out[k] = vals
    if pos != raw.numel():
        raise ValueError(f"KIVI body has {raw.numel() - pos} trailing bytes")
    return out


class KIVISerde(CompressingSerde):
    """Serde option ``kivi``: 2-bit KIVI quantization (see module doc for layout and bounds).

    Args:
        group_size: elements per (scale, zero point) group, 1..65535 (default 32).
        bits: code width, one of 1, 2, 4, 8 (default 2).
        device: where quantization runs (``cpu``, ``cuda``, ``auto``).

    Raises:
        ValueError: group_size or bits out of range (the message names the value).
    """

    name = "kivi"
    codec = CODEC

    def __init__(self, group_size: int = 32, bits: int = 2, device: str = "cpu") -> None:
        super().__init__(device)
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"bits={bits!r}: expected one of 1, 2, 4, 8")
        if not isinstance(group_size, int) or not 1 <= group_size <= 65535 or \
                (group_size * bits) % 8:
            raise ValueError(f"group_size={group_size!r}: expected an int in 1..65535 whose "
                             f"groups fill whole bytes at bits={bits}")
        self.group_size = group_size
        self.bits = bits

    def encode_body(self, x: torch.Tensor, dtype: torch.dtype) -> bytes:
        """KIVI body of canonical KV ``x`` (module doc)."""
        return encode_kivi(x, self.group_size, self.bits)
