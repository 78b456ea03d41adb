"""The sha256_cbor / xxhash_cbor prefix-hash chain, with every token CBOR-encoded at once.

The bytes hashed for chunk i are ``cbor2.dumps((parent, tuple(tokens), ()), canonical=True)``: an
array of 3 (0x83), the parent's int, the tokens' array head, one int per token, and the empty
array (0x80). Canonical CBOR (RFC 8949 §4.2.1, cbor2's ``canonical=True``) writes every int in its
shortest form: a token ``v`` in [0, 2**32) is ``v`` itself (v < 24), ``0x18 v`` (< 256),
``0x19`` + 2 big-endian bytes (< 65536) or ``0x1a`` + 4 big-endian bytes. So all tokens are
encoded once and each chunk is hashed from a slice of the result: bit for bit cbor2's bytes
(tests/unit/token_database/test_cbor_chain.py compares them with cbor2 on every int width).

Two encoders give the same bytes: numpy array operations (always; ~3 ms for 128k tokens on a
2-core host) and a compiled loop (numba; ~0.6 ms), which a process must switch on with
:func:`enable_compiled_encoder` and which is then used from :data:`JIT_MIN_TOKENS` tokens.
Only processes that never start a vLLM engine afterwards may switch it on (the controller does):
vLLM 0.32's CPU platform, when a worker starts, walks every imported module and fails on
llvmlite's ``binding.ffi.lib`` (``vars()`` of it is not a dict), so importing numba before an
engine starts in the same process breaks that engine's start.

A token < 0 or >= 2**32 is left to cbor2 (the caller's slow path: :meth:`CborTokens.build`
returns None).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

CBOR_DIGESTS = {"sha256_cbor": "sha256", "sha256_cbor_64bit": "sha256", "xxhash_cbor": "xxh3"}
"""Hash algorithm names of :mod:`lmcache.token_database.hashing` this module computes."""

JIT_MIN_TOKENS = 16384
"""Token count from which the compiled encoder is used once switched on (below it numpy is as
fast)."""

_U32 = 1 << 32


def _cbor_head(major: int, value: int) -> bytes:
    """CBOR head of ``major`` type with argument ``value`` (0 <= value < 2**64), shortest form."""
    if value >= _U32:  # a chain hash, mostly
        if value >= 1 << 64:
            raise ValueError(f"CBOR int argument {value} does not fit in 64 bits")
        return bytes((major << 5 | 27,)) + value.to_bytes(8, "big")
    if value < 24:
        return bytes((major << 5 | value,))
    for info, size in ((24, 1), (25, 2), (26, 4)):
        if value < 1 << (8 * size):
            return bytes((major << 5 | info,)) + value.to_bytes(size, "big")
    raise AssertionError("unreachable")


def cbor_int(value: int) -> bytes:
    """Canonical CBOR of an int in [-2**64, 2**64) (what ``cbor2.dumps`` writes).

    Raises:
        ValueError: outside that range.
    """
    return _cbor_head(0, value) if value >= 0 else _cbor_head(1, -1 - value)


# ---- encoders: (int64 tokens, chunk_size) -> (bytes as uint8 array, chunk byte bounds) --------
def _encode_loop(values, chunk_size, out, bounds):  # pragma: no cover - compiled by numba
    """Canonical CBOR of each of ``values`` (int64) into ``out`` (uint8, >= 5 * n + 8 bytes);
    ``bounds[k]`` = byte offset of token ``k * chunk_size``, ``bounds[-1]`` = the total. Each
    item's 5 bytes are written and the next one starts after its length (branch-free).
    Returns the total, or -1 when a value is < 0 or >= 2**32 (nothing usable written)."""
    n = values.size
    j = 0
    k = 0
    for s in range(0, n, chunk_size):
        bounds[k] = j
        k += 1
        for i in range(s, min(s + chunk_size, n)):
            v = values[i]
            if v < 0 or v > 0xFFFFFFFF:
                return -1
            g24 = 1 if v >= 24 else 0
            g256 = 1 if v >= 256 else 0
            g64k = 1 if v >= 65536 else 0
            extra = g24 + g256 + 2 * g64k  # bytes after the head: 0, 1, 2 or 4
            x = v << (32 - 8 * extra)  # those bytes at the top of a 32-bit word
            out[j] = min(v, 24) + g256 + g64k
            out[j + 1] = (x >> 24) & 255
            out[j + 2] = (x >> 16) & 255
            out[j + 3] = (x >> 8) & 255
            out[j + 4] = x & 255
            j += extra + 1
    bounds[k] = j
    return j


_JIT = None  # None: not switched on; False: numba unavailable; else the compiled _encode_loop
_JIT_LOCK = threading.Lock()


def enable_compiled_encoder():
    """Switch this process to the compiled encoder (numba, compiled once, cached on disk) for
    long token sequences; returns it, or None when numba cannot be imported or compiled here
    (then numpy encodes; logged once). Call it only in a process that will not start a vLLM
    engine afterwards (see the module docstring); the lmcache controller calls it at start."""
    global _JIT
    if _JIT is None:
        with _JIT_LOCK:
            if _JIT is None:
                _JIT = False
                for cache in (True, False):  # (no writable cache directory: compile each run)
                    try:
                        import numba

                        fn = numba.njit(cache=cache, nogil=True, boundscheck=False)(_encode_loop)
                        fn(np.zeros(1, np.int64), 1, np.zeros(8, np.uint8), np.zeros(2, np.int64))
                        _JIT = fn
                        break
                    except Exception as e:  # noqa: BLE001 - any failure: the numpy encoder
                        logger.info("CBOR token encoding: numba (cache=%s) unavailable: %s: %s",
                                    cache, type(e).__name__, e)
    return _JIT or None


_WORK = threading.local()


def _workspace(n: int) -> dict:
    """Per-thread arrays for encoding up to ``n`` values, reused across calls (fresh memory
    costs page faults that take longer than the encoding on small hosts)."""
    ws = getattr(_WORK, "ws", None)
    if ws is None or ws["n"] < n:
        m = max(n, 4096)
        ws = _WORK.ws = {"n": m, "a": np.empty(m, np.uint32), "be": np.empty(m, ">u4"),
                         "t": np.empty(m, bool), "lens": np.empty(m, np.int64),
                         "mat": np.empty((m, 5), np.uint8), "keep": np.empty((m, 5), bool),
                         "data": np.empty(5 * m + 8, np.uint8), "off": np.empty(m + 1, np.int64)}
    return ws


_KEEP = np.zeros((6, 5), dtype=bool)  # item length -> which of its 5 bytes are written
_KEEP[:, 0] = True
for _size in (2, 3, 5):
    _KEEP[_size, 6 - _size:] = True


def encode_numpy(values: np.ndarray, chunk_size: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(data, bounds)`` of the canonical CBOR of ``values`` (1-D int64) with numpy: each
    value's 5-byte form (head, 4 big-endian bytes), of which the head and the last ``len - 1``
    bytes are kept; ``bounds`` as :func:`_encode_loop`'s. None when a value is outside
    [0, 2**32). ``data`` is a view of a per-thread workspace, valid until the next call."""
    n = values.size
    if n and (int(values.min()) < 0 or int(values.max()) >= _U32):
        return None
    ws = _workspace(n)
    a, t, lens, mat = ws["a"][:n], ws["t"][:n], ws["lens"][:n], ws["mat"][:n]
    np.copyto(a, values, casting="unsafe")
    np.greater_equal(a, 24, out=t)
    np.copyto(lens, t)
    mat[:, 0] = 24
    np.greater_equal(a, 256, out=t)
    lens += t
    mat[:, 0] += t
    np.greater_equal(a, 65536, out=t)
    lens += 2 * t
    mat[:, 0] += t
    np.less(a, 24, out=t)
    np.copyto(mat[:, 0], a, where=t, casting="unsafe")
    lens += 1
    be = ws["be"][:n]
    np.copyto(be, a)
    mat[:, 1:] = be.view(np.uint8).reshape(n, 4)
    keep = ws["keep"][:n]
    np.take(_KEEP, lens, axis=0, out=keep)
    offsets = ws["off"][:n + 1]
    offsets[0] = 0
    np.cumsum(lens, out=offsets[1:])
    data = ws["data"][:int(offsets[-1])]
    np.compress(keep.reshape(-1), mat.reshape(-1), out=data)
    starts = np.arange(0, n, chunk_size)
    bounds = np.append(offsets[starts], offsets[-1])
    return data, bounds


def encode_jit(values: np.ndarray, chunk_size: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Like :func:`encode_numpy` (``values``: 1-D, C-contiguous int64), with the compiled loop.

    Raises:
        RuntimeError: :func:`enable_compiled_encoder` did not succeed in this process.
    """
    kernel = _JIT
    if not kernel:
        raise RuntimeError("the compiled CBOR encoder is not switched on in this process "
                           "(enable_compiled_encoder() returned None or was not called)")
    n = values.size
    ws = _workspace(n)
    bounds = np.empty(-(-n // chunk_size) + 1, np.int64)
    total = kernel(values, chunk_size, ws["data"], bounds)
    return None if total < 0 else (ws["data"][:total], bounds)


def encode(values: np.ndarray, chunk_size: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The compiled encoder from :data:`JIT_MIN_TOKENS` values when this process switched it on,
    else numpy."""
    if values.size >= JIT_MIN_TOKENS and _JIT:
        return encode_jit(values, chunk_size)
    return encode_numpy(values, chunk_size)


def _xxh3_128_new():
    import xxhash as _xx

    return _xx.xxh3_128


class CborTokens:
    """The canonical CBOR of every token of a sequence, encoded once, hashed chunk by chunk on
    demand: :meth:`chain` gives the values of :func:`lmcache.token_database.hashing.make_hash_fn`
    ``(name)`` over ``(parent, tuple(chunk), ())``. Build with :meth:`build` (None when the fast
    path does not apply: another algorithm, a token < 0 or >= 2**32)."""

    def __init__(self, name: str, data: np.ndarray, bounds: np.ndarray, chunk_size: int) -> None:
        self._new = hashlib.sha256 if CBOR_DIGESTS[name] == "sha256" else _xxh3_128_new()
        self._view = memoryview(data.tobytes())  # own copy: the workspace is reused
        self.chunk_size = chunk_size
        self._bounds = bounds.tolist()  # byte offset of each chunk start, then the end
        self._head = _cbor_head(4, chunk_size)

    @classmethod
    def build(cls, name: str, tokens, chunk_size: int) -> Optional["CborTokens"]:
        """``tokens``: 1-D int tensor or numpy array, cut into ``chunk_size`` chunks from 0."""
        if name not in CBOR_DIGESTS:
            return None
        arr = tokens.numpy() if hasattr(tokens, "numpy") else np.asarray(tokens)
        enc = encode(np.ascontiguousarray(arr, dtype=np.int64), chunk_size)
        return None if enc is None else cls(name, *enc, chunk_size)

    def chain(self, parent: int, start: int, end: int) -> list[int]:
        """Hashes of the chunks of tokens ``[start, end)`` after ``parent`` (``start`` a chunk
        boundary; ``end`` one too, or the end of the tokens)."""
        c, bounds, view, new, head = self.chunk_size, self._bounds, self._view, self._new, \
            self._head
        out = []
        k = start // c
        for b in range(start, end, c):
            size = end - b
            if parent >= _U32 and parent < 1 << 64:  # 8-byte form (all but 2**-32 of hashes)
                pre = b"\x83\x1b" + parent.to_bytes(8, "big")
            else:
                pre = b"\x83" + cbor_int(parent)
            h = new(pre + (head if size >= c else _cbor_head(4, size)))
            h.update(view[bounds[k]:bounds[k + 1]])
            h.update(b"\x80")
            parent = int.from_bytes(h.digest()[:8], "big")
            out.append(parent)
            k += 1
        return out


def cbor_chain(name: str, parent: int, tokens, chunk_size: int, end: int) -> Optional[list[int]]:
    """The chain hashes of the chunks of ``tokens[:end]`` after ``parent`` (see
    :class:`CborTokens`); None when the fast path does not apply."""
    enc = CborTokens.build(name, tokens[:end], chunk_size)
    return None if enc is None else enc.chain(parent, 0, end)
