"""CacheGenSerde: layer-group quantization + token-delta + entropy coding (CacheGen).

CacheGen (Liu et al., SIGCOMM'24) shrinks KV by quantizing with more bins in early layers (they
matter more), exploiting the similarity of neighbouring tokens, and entropy-coding the symbols
with probability tables fitted to the data. lmcache's stream (its own layout, not LMCache's
pickled one; LMCache 0.5.6's bins per layer group are the defaults), in the canonical view
``[K, L, T, D]`` (see :mod:`lmcache.serde.compressed`):

1. **Quantize.** Layer ``l`` of keys uses ``key_bins[0]`` bins when ``l < key_early_layers``,
   else ``key_bins[1]`` (values: ``value_bins``, ``value_early_layers``); ``C = bins // 2 - 1``
   and ``q = round(x / m * C)`` in ``[-C, C]``, where ``m`` (fp16) is the max |x| of the
   channel over the chunk's tokens for keys (keys have outlier channels) and of the token over
   its channels for values (LMCache's choice). Error bound: ``|x - x'| <= m / (2 C)``.
2. **Token-delta where it helps.** Each table (below) holds either the symbols ``q + C`` or the
   differences along tokens ``q[t] - q[t-1]`` (``q[-1] = 0``) plus ``2C``, whichever has the
   smaller empirical entropy (table cost included); decoding takes a cumulative sum.
3. **Entropy coding.** One table per (K/V, layer, group of ``channel_group`` channels): its
   symbol counts (u16, scaled to fit) are stored in the stream and define a categorical model;
   the symbols, in (token, channel) order, are ANS-coded with ``constriction``'s ``AnsCoder``
   (32-bit words). Tables are independent, so they decode in any order or in parallel.

Body (little-endian): ``channel_group u16 | 0 u16 | bins u8 [K * L]`` | key scales fp16
``[L, D]`` | (K = 2) value scales fp16 ``[L, T]`` | tables in (k, layer, group) order, each
``mode u8 | lo u8 | n u8 | 0 u8 | nwords u32 | counts u16[n] | words u32[nwords]`` (symbol =
``lo + index`` into counts).
"""

from __future__ import annotations

import struct
from typing import Sequence

import numpy as np
import torch

from lmcache.serde.compressed import CompressingSerde

CODEC = 1
PARAMS = struct.Struct("<HH")
TABLE = struct.Struct("<BBBxI")
RAW, DELTA = 0, 1


def _coder():
    import constriction

    return constriction.stream.model.Categorical, constriction.stream.stack.AnsCoder


def layer_bins(layers: int, bins: Sequence[int], early: int) -> list[int]:
    """Bins of each layer: ``bins[0]`` for the first ``early`` layers, then ``bins[1]``."""
    return [int(bins[0]) if i < early else int(bins[1]) for i in range(layers)]


def quantize(x: torch.Tensor, bins: Sequence[int], per_channel: bool):
    """One K/V half ``x`` ``[L, T, D]`` → (q int8 ``[L, T, D]`` in [-C, C], fp16 maxima:
    ``[L, D]`` when ``per_channel`` else ``[L, T]``)."""
    c = torch.tensor([b // 2 - 1 for b in bins], dtype=torch.float32, device=x.device)
    m = x.float().abs().amax(dim=1 if per_channel else 2).clamp(max=65504).half()
    mf = m.float()
    mf = torch.where(mf > 0, mf, torch.ones_like(mf))
    mf = mf[:, None, :] if per_channel else mf[:, :, None]
    q = torch.round(x.float() / mf * c[:, None, None])
    q = torch.maximum(torch.minimum(q, c[:, None, None]), -c[:, None, None])
    return q.to(torch.int8), m


def _entropy_bits(counts: np.ndarray) -> float:
    nz = counts[counts > 0].astype(np.float64)
    total = nz.sum()
    return float(-(nz * np.log2(nz / total)).sum()) + 16 * (np.ptp(np.flatnonzero(counts)) + 1)


def _encode_table(sym: np.ndarray, mode: int) -> bytes:
    categorical, ans = _coder()
    lo, hi = int(sym.min()), int(sym.max())
    counts = np.bincount(sym - lo, minlength=hi - lo + 1).astype(np.float64)
    if counts.max() > 65535:
        counts = np.where(counts > 0, np.maximum(1, np.round(counts * 65535 / counts.max())), 0)
    counts = counts.astype(np.uint16)
    coder = ans()
    coder.encode_reverse((sym - lo).astype(np.int32),
                         categorical(counts.astype(np.float64), perfect=False))
    words = coder.get_compressed().astype(np.uint32)
    return TABLE.pack(mode, lo, len(counts), words.size) + counts.tobytes() + words.tobytes()


def encode_cachegen(x: torch.Tensor, kbins: Sequence[int], vbins: Sequence[int],
                    channel_group: int) -> bytes:
    """Body bytes of canonical KV ``x`` ``[K, L, T, D]`` with per-layer bins."""
    kk, layers, tokens, dim = x.shape
    out = [PARAMS.pack(channel_group, 0), bytes(kbins) + (bytes(vbins) if kk == 2 else b"")]
    qs = []
    for k in range(kk):
        q, m = quantize(x[k], kbins if k == 0 else vbins, per_channel=k == 0)
        qs.append(q)
        out.append(m.cpu().numpy().tobytes())
    q_all = torch.stack(qs).cpu().numpy().astype(np.int16)  # [K, L, T, D]
    for k in range(kk):
        for layer in range(layers):
            c = (kbins if k == 0 else vbins)[layer] // 2 - 1
            q = q_all[k, layer]
            delta = np.diff(q, axis=0, prepend=0)
            for g0 in range(0, dim, channel_group):
                raw = q[:, g0:g0 + channel_group].reshape(-1) + c
                dlt = delta[:, g0:g0 + channel_group].reshape(-1) + 2 * c
                use_delta = _entropy_bits(np.bincount(dlt)) < _entropy_bits(np.bincount(raw))
                out.append(_encode_table(dlt if use_delta else raw, DELTA if use_delta else RAW))
    return b"".join(out)


def decode_body(body: memoryview, kk: int, layers: int, tokens: int, dim: int, device: str,
                dtype: torch.dtype) -> torch.Tensor:
    """Canonical KV ``[K, L, T, D]`` (float32, on ``device``) from a CacheGen body.

    Raises:
        ValueError: inconsistent parameters, tables or lengths.
    """
    categorical, ans = _coder()
    buf = bytes(body)
    group, _ = PARAMS.unpack_from(buf)
    if group < 1:
        raise ValueError(f"CacheGen body with channel_group={group}")
    pos = PARAMS.size
    bins = list(buf[pos:pos + kk * layers])
    pos += kk * layers
    if len(bins) != kk * layers or any(b < 4 or b > 128 for b in bins):
        raise ValueError(f"CacheGen body with bins {bins}")
    scales = []
    for k in range(kk):
        n = layers * (dim if k == 0 else tokens)
        scales.append(np.frombuffer(buf, np.float16, n, pos))
        pos += 2 * n
    q = np.empty((kk, layers, tokens, dim), dtype=np.int16)
    for k in range(kk):
        for layer in range(layers):
            c = bins[k * layers + layer] // 2 - 1
            for g0 in range(0, dim, group):
                width = min(group, dim - g0)
                mode, lo, n, nwords = TABLE.unpack_from(buf, pos)
                pos += TABLE.size
                counts = np.frombuffer(buf, np.uint16, n, pos).astype(np.float64)
                pos += 2 * n
                words = np.frombuffer(buf, np.uint32, nwords, pos)
                pos += 4 * nwords
                if mode not in (RAW, DELTA) or n < 1 or counts.sum() <= 0:
                    raise ValueError(f"CacheGen table with mode {mode}, {n} symbols")
                sym = ans(words.copy()).decode(categorical(counts, perfect=False),
                                               tokens * width).astype(np.int16) + lo
                sym = sym.reshape(tokens, width)
                q[k, layer, :, g0:g0 + width] = (np.cumsum(sym - 2 * c, axis=0) if mode == DELTA
                                                 else sym - c)
    if pos != len(buf):
        raise ValueError(f"CacheGen body has {len(buf) - pos} trailing bytes")
    qt = torch.from_numpy(q).to(device).float()
    out = torch.empty_like(qt)
    for k in range(kk):
        c = torch.tensor([b // 2 - 1 for b in bins[k * layers:(k + 1) * layers]],
                         dtype=torch.float32, device=device)
        m = torch.from_numpy(scales[k].copy()).to(device).float().view(layers, -1)
        m = m[:, None, :] if k == 0 else m[:, :, None]
        out[k] = qt[k] * m / c[:, None, None]
    return out


class CacheGenSerde(CompressingSerde):
    """Serde option ``cachegen`` (see module doc for the stream and error bound).

    Args:
        key_bins / value_bins: ``[early, late]`` bins (LMCache: keys 32/16, values 32/16);
            each even, 4..128.
        key_early_layers / value_early_layers: layers that get the early bins (LMCache: 10, 2;
            for models under 10 layers LMCache uses 32 bins everywhere).
        channel_group: channels per probability table (1..65535).
        device: where quantization runs (``cpu``, ``cuda``, ``auto``); entropy coding runs on
            the CPU (constriction).

    Raises:
        ValueError: a value out of range (the message names it).
    """

    name = "cachegen"
    codec = CODEC

    def __init__(self, key_bins: Sequence[int] = (32, 16), value_bins: Sequence[int] = (32, 16),
                 key_early_layers: int = 10, value_early_layers: int = 2,
                 channel_group: int = 16, device: str = "cpu") -> None:
        super().__init__(device)
        for name, bins in (("key_bins", key_bins), ("value_bins", value_bins)):
            bins = list(bins)
            if len(bins) != 2 or any(not isinstance(b, int) or b % 2 or not 4 <= b <= 128
                                     for b in bins):
                raise ValueError(f"{name}={bins!r}: expected [early, late], even ints in 4..128")
        for name, v in (("key_early_layers", key_early_layers),
                        ("value_early_layers", value_early_layers)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r}: expected an int >= 0")
        if not isinstance(channel_group, int) or not 1 <= channel_group <= 65535:
            raise ValueError(f"channel_group={channel_group!r}: expected an int in 1..65535")
        self.key_bins, self.value_bins = list(key_bins), list(value_bins)
        self.key_early_layers, self.value_early_layers = key_early_layers, value_early_layers
        self.channel_group = channel_group

    def encode_body(self, x: torch.Tensor, dtype: torch.dtype) -> bytes:
        """CacheGen body of canonical KV ``x`` (module doc)."""
        layers = x.shape[1]
        return encode_cachegen(
            x, layer_bins(layers, self.key_bins, self.key_early_layers),
            layer_bins(layers, self.value_bins, self.value_early_layers), self.channel_group)
