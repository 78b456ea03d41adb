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

Body (little-endian; each section starts 4-byte aligned, zero padding): ``channel_group u16 |
0 u16 | ntables u32 | bins u8 [K * L]`` | key scales fp16 ``[L, D]`` | (K = 2) value scales
fp16 ``[L, T]`` | directory: per table, in (k, layer, group) order, ``mode u8 | lo u8 | n u8 |
0 u8 | nwords u32`` | all tables' counts u16 (``n`` each; symbol = ``lo + index``) | all
tables' ANS words u32 (``nwords`` each, constriction's ``AnsCoder.get_compressed()``).
The directory lets a decoder find every table without walking the stream, so the CUDA decoder
(:mod:`lmcache.serde.cachegen_cuda`) decodes all tables at once, one GPU thread per table,
bit-exactly like constriction (its probability quantization and 64-bit-state/32-bit-word ANS
are reproduced there).
"""

from __future__ import annotations

import struct
from typing import Sequence

import numpy as np
import torch

from lmcache.serde.compressed import CompressingSerde

CODEC = 1
PARAMS = struct.Struct("<HHI")
DIRECTORY = np.dtype([("mode", "u1"), ("lo", "u1"), ("n", "u1"), ("pad", "u1"),
                      ("nwords", "<u4")])
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


def _encode_table(sym: np.ndarray, mode: int) -> tuple[tuple, np.ndarray, np.ndarray]:
    """(directory entry, counts u16, ANS words u32) of one table's symbols."""
    categorical, ans = _coder()
    lo, hi = int(sym.min()), int(sym.max())
    counts = np.bincount(sym - lo, minlength=hi - lo + 1).astype(np.float64)
    if counts.max() > 65535:
        counts = np.where(counts > 0, np.maximum(1, np.round(counts * 65535 / counts.max())), 0)
    counts = counts.astype(np.uint16)
    if len(counts) == 1:  # constriction's categorical needs two symbols: add an unused one
        counts = np.array([counts[0], 0], dtype=np.uint16)
    coder = ans()
    coder.encode_reverse((sym - lo).astype(np.int32),
                         categorical(counts.astype(np.float64), perfect=False))
    words = coder.get_compressed().astype(np.uint32)
    return (mode, lo, len(counts), 0, words.size), counts, words


def _pad4(parts: list) -> None:
    size = sum(len(p) for p in parts)
    if size % 4:
        parts.append(bytes(4 - size % 4))


def encode_cachegen(x: torch.Tensor, kbins: Sequence[int], vbins: Sequence[int],
                    channel_group: int) -> bytes:
    """Body bytes of canonical KV ``x`` ``[K, L, T, D]`` with per-layer bins."""
    kk, layers, tokens, dim = x.shape
    ntables = kk * layers * (-(-dim // channel_group))
    out = [PARAMS.pack(channel_group, 0, ntables),
           bytes(kbins) + (bytes(vbins) if kk == 2 else b"")]
    _pad4(out)
    qs = []
    for k in range(kk):
        q, m = quantize(x[k], kbins if k == 0 else vbins, per_channel=k == 0)
        qs.append(q)
        out.append(m.cpu().numpy().tobytes())
    _pad4(out)
    q_all = torch.stack(qs).cpu().numpy().astype(np.int16)  # [K, L, T, D]
    entries, counts, words = [], [], []
    for k in range(kk):
        for layer in range(layers):
            c = (kbins if k == 0 else vbins)[layer] // 2 - 1
            q = q_all[k, layer]
            delta = np.diff(q, axis=0, prepend=0)
            for g0 in range(0, dim, channel_group):
                raw = q[:, g0:g0 + channel_group].reshape(-1) + c
                dlt = delta[:, g0:g0 + channel_group].reshape(-1) + 2 * c
                use_delta = _entropy_bits(np.bincount(dlt)) < _entropy_bits(np.bincount(raw))
                entry, cnt, wds = _encode_table(dlt if use_delta else raw,
                                                DELTA if use_delta else RAW)
                entries.append(entry)
                counts.append(cnt)
                words.append(wds)
    out.append(np.array(entries, dtype=DIRECTORY).tobytes())
    out.append(np.concatenate(counts).tobytes())
    _pad4(out)
    out.append(np.concatenate(words).tobytes())
    return b"".join(out)


def parse_body(buf, kk: int, layers: int, tokens: int, dim: int) -> dict:
    """Sections of a CacheGen body as numpy views (shared by the CPU and CUDA decoders):
    ``group``, ``bins`` (list), ``scales`` (fp16 per K/V), ``directory`` (structured),
    ``counts`` (u16), ``words`` (u32), ``count_off``/``word_off`` (int64 per table).

    Raises:
        ValueError: inconsistent parameters or lengths.
    """
    group, _, ntables = PARAMS.unpack_from(buf)
    if group < 1 or ntables != kk * layers * (-(-dim // group)):
        raise ValueError(f"CacheGen body with channel_group={group}, {ntables} tables")
    pos = PARAMS.size
    bins = list(bytes(buf[pos:pos + kk * layers]))
    pos += kk * layers
    pos += -pos % 4
    if len(bins) != kk * layers or any(b < 4 or b > 128 for b in bins):
        raise ValueError(f"CacheGen body with bins {bins}")
    scales = []
    for k in range(kk):
        n = layers * (dim if k == 0 else tokens)
        scales.append(np.frombuffer(buf, np.float16, n, pos))
        pos += 2 * n
    pos += -pos % 4
    directory = np.frombuffer(buf, DIRECTORY, ntables, pos)
    pos += DIRECTORY.itemsize * ntables
    n = directory["n"].astype(np.int64)
    nwords = directory["nwords"].astype(np.int64)
    if (n < 2).any() or (directory["mode"] > DELTA).any():
        raise ValueError("CacheGen table directory with a bad mode or symbol count")
    counts = np.frombuffer(buf, np.uint16, int(n.sum()), pos)
    pos += 2 * int(n.sum())
    pos += -pos % 4
    words = np.frombuffer(buf, np.uint32, int(nwords.sum()), pos)
    pos += 4 * int(nwords.sum())
    if pos != len(buf):
        raise ValueError(f"CacheGen body is {len(buf)} bytes, its directory says {pos}")
    return {"group": group, "bins": bins, "scales": scales, "directory": directory,
            "counts": counts, "words": words,
            "count_off": np.concatenate([[0], np.cumsum(n)[:-1]]),
            "word_off": np.concatenate([[0], np.cumsum(nwords)[:-1]])}


def dequantize(q: torch.Tensor, parts: dict, layers: int) -> torch.Tensor:
    """Canonical KV (float32, on ``q``'s device) from symbols ``q`` ``[K, L, T, D]``."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    bins = parts["bins"]
    for k in range(q.shape[0]):
        c = torch.tensor([b // 2 - 1 for b in bins[k * layers:(k + 1) * layers]],
                         dtype=torch.float32, device=q.device)
        m = torch.from_numpy(parts["scales"][k].copy()).to(q.device).float().view(layers, -1)
        m = m[:, None, :] if k == 0 else m[:, :, None]
        out[k] = q[k].float() * m / c[:, None, None]
    return out


def decode_body(body, kk: int, layers: int, tokens: int, dim: int, device: str,
                dtype: torch.dtype) -> torch.Tensor:
    """Canonical KV ``[K, L, T, D]`` (float32, on ``device``) from a CacheGen body. On a CUDA
    device the tables are decoded by the CUDA kernel when CuPy is present, else by
    constriction on the CPU; both give the same symbols.

    Raises:
        ValueError: inconsistent parameters, tables or lengths.
    """
    buf = memoryview(body).cast("B") if not isinstance(body, bytes) else body
    parts = parse_body(buf, kk, layers, tokens, dim)
    if str(device).startswith("cuda"):
        from lmcache.serde import cachegen_cuda

        if cachegen_cuda.available():
            q = cachegen_cuda.decode_symbols(parts, kk, layers, tokens, dim, device)
            return dequantize(q, parts, layers)
    categorical, ans = _coder()
    group, bins, directory = parts["group"], parts["bins"], parts["directory"]
    q = np.empty((kk, layers, tokens, dim), dtype=np.int16)
    t = 0
    for k in range(kk):
        for layer in range(layers):
            c = bins[k * layers + layer] // 2 - 1
            for g0 in range(0, dim, group):
                width = min(group, dim - g0)
                mode, lo, n, _, nwords = directory[t].tolist()
                co, wo = int(parts["count_off"][t]), int(parts["word_off"][t])
                counts = parts["counts"][co:co + n].astype(np.float64)
                if counts.sum() <= 0:
                    raise ValueError(f"CacheGen table {t} has no symbol counts")
                words = parts["words"][wo:wo + nwords].copy()
                sym = ans(words).decode(categorical(counts, perfect=False),
                                        tokens * width).astype(np.int16) + lo
                sym = sym.reshape(tokens, width)
                q[k, layer, :, g0:g0 + width] = (np.cumsum(sym - 2 * c, axis=0) if mode == DELTA
                                                 else sym - c)
                t += 1
    return dequantize(torch.from_numpy(q).to(device), parts, layers)


class CacheGenSerde(CompressingSerde):
    """Serde option ``cachegen`` (see module doc for the stream and error bound).

    Args:
        key_bins / value_bins: ``[early, late]`` bins (LMCache: keys 32/16, values 32/16);
            each even, 4..128.
        key_early_layers / value_early_layers: layers that get the early bins (LMCache: 10, 2;
            for models under 10 layers LMCache uses 32 bins everywhere).
        channel_group: channels per probability table (1..65535).
        device: where the arithmetic runs (``cpu``, ``cuda``, ``auto``): on ``cuda``,
            quantization and the decoding of all tables (csrc/cachegen_ans.cu, one thread a
            table) run on the GPU; encoding's entropy coder is constriction on the CPU.

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
