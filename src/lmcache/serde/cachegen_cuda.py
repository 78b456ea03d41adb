"""CUDA decoder of the cachegen serde: every ANS table of a chunk decoded at once on the GPU.

``csrc/cachegen_ans.cu`` (compiled at first use by CuPy's NVRTC) runs one thread per table
(K/V, layer, channel group); the tables are independent, so a Llama-8B chunk (4096 tables)
fills the GPU. The probability tables are quantized on the host exactly as constriction's
``Categorical(perfect=False)`` does (``fast_quantized_cdf``: ``cdf[i] = floor(cum_i * (2^24 -
n) / total) + i`` in float64, exact for integer counts), so the symbols equal the CPU
decoder's bit for bit (tested on the device).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

PRECISION = 24


def available() -> bool:
    """True when CuPy imports and torch sees a CUDA device."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernel(device_index: int):
    import cupy

    from lmcache.gpu_connector.cupy_kernels import csrc_dir

    source = (csrc_dir() / "cachegen_ans.cu").read_text()
    with cupy.cuda.Device(device_index):
        return cupy.RawKernel(source, "cachegen_ans_decode")


def quantized_cdfs(counts: np.ndarray, count_off: np.ndarray, nsym: np.ndarray):
    """(cdf int32, cdf_off int64): each table's ``n + 1`` cumulative 24-bit probabilities, as
    constriction builds them from float64 counts."""
    counts = counts.astype(np.float64)
    ntab = len(nsym)
    total = np.add.reduceat(counts, count_off) if ntab else counts[:0]
    scale = ((1 << PRECISION) - nsym).astype(np.float64) / total
    table_of = np.repeat(np.arange(ntab), nsym)
    excl = np.cumsum(counts) - counts
    cum = excl - excl[count_off][table_of]  # exact: integer counts far below 2^53
    idx = np.arange(len(counts)) - count_off[table_of]
    left = np.floor(cum * scale[table_of]).astype(np.int64) + idx
    cdf = np.empty(len(counts) + ntab, dtype=np.int32)
    cdf_off = count_off + np.arange(ntab)
    pos = np.arange(len(counts)) + table_of
    cdf[pos] = left
    cdf[cdf_off + nsym] = 1 << PRECISION
    return cdf, cdf_off.astype(np.int64)


def kernel_tables(parts: dict, kk: int, layers: int, tokens: int, dim: int) -> dict:
    """Host-side arrays of the kernel (numpy): per table word/cdf offsets, symbol counts,
    value offsets ``add``, widths and output bases, plus the per-channel delta mask."""
    from lmcache.serde.cachegen import DELTA

    directory, group, bins = parts["directory"], parts["group"], parts["bins"]
    ntab = len(directory)
    groups = -(-dim // group)
    t = np.arange(ntab)
    k, layer, g = t // (layers * groups), (t // groups) % layers, t % groups
    c = np.array(bins, dtype=np.int64)[k * layers + layer] // 2 - 1
    mode = directory["mode"].astype(np.int64)
    nsym = directory["n"].astype(np.int64)
    width = np.minimum(group, dim - g * group)
    cdf, cdf_off = quantized_cdfs(parts["counts"], parts["count_off"], nsym)
    return {"words": parts["words"], "word_off": parts["word_off"],
            "nwords": directory["nwords"], "cdf": cdf, "cdf_off": cdf_off, "nsym": nsym,
            "add": directory["lo"].astype(np.int64) - np.where(mode == DELTA, 2 * c, c),
            "width": width, "out_base": ((k * layers + layer) * tokens) * dim + g * group,
            "delta": np.repeat(mode == DELTA, width).reshape(kk, layers, 1, dim)}


_ARGS = (("words", np.uint32), ("word_off", np.int64), ("nwords", np.uint32),
         ("cdf", np.int32), ("cdf_off", np.int64), ("nsym", np.int32), ("add", np.int32),
         ("width", np.int32), ("out_base", np.int64))


def upload(parts: dict, kk: int, layers: int, tokens: int, dim: int, device) -> dict:
    """The kernel's per-table arrays and the ANS words as tensors on ``device``."""
    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    tab = kernel_tables(parts, kk, layers, tokens, dim)
    out = {"device": dev, "ntables": len(tab["nsym"]),
           "delta": torch.from_numpy(tab["delta"]).to(dev)}
    for name, dtype in _ARGS:
        a = tab[name]
        if a.dtype != dtype or not a.flags.writeable:
            a = np.array(a, dtype=dtype)
        out[name] = torch.from_numpy(a.view(np.int32) if dtype == np.uint32 else a).to(dev)
    return out


def decode_uploaded(tab: dict, kk: int, layers: int, tokens: int, dim: int) -> torch.Tensor:
    """Symbols ``q`` int32 ``[K, L, T, D]`` from :func:`upload`'s tensors (the GPU part)."""
    import cupy

    dev = tab["device"]
    ntab = tab["ntables"]
    out = torch.empty((kk, layers, tokens, dim), dtype=torch.int16, device=dev)
    stream = torch.cuda.current_stream(dev)
    args = tuple(cupy.asarray(tab[name]) for name, _ in _ARGS)
    with cupy.cuda.Device(dev.index), cupy.cuda.ExternalStream(stream.cuda_stream):
        threads = 32  # one warp a block: the tables spread over all SMs
        _kernel(dev.index)(((ntab + threads - 1) // threads,), (threads,),
                           args + (cupy.asarray(out), np.int32(ntab), np.int32(tokens),
                                   np.int32(dim)))
    q = out.to(torch.int32)
    return torch.where(tab["delta"], q.cumsum(dim=2), q)


def decode_symbols(parts: dict, kk: int, layers: int, tokens: int, dim: int,
                   device) -> torch.Tensor:
    """Quantized symbols ``q`` int32 ``[K, L, T, D]`` on ``device`` from a parsed body
    (:func:`lmcache.serde.cachegen.parse_body`)."""
    return decode_uploaded(upload(parts, kk, layers, tokens, dim, device), kk, layers, tokens,
                           dim)
