"""Chunk hash functions of the prefix-hash chain (DESIGN.md §4.2), as LMCache runs them in vLLM 0.32.

Every name vLLM 0.32's ``vllm.utils.hashing.get_hash_fn_by_name`` accepts, with identical values,
plus LMCache's ``builtin`` and its old alias ``sha256_cbor_64bit``:

=================  ===========================================================================
``sha256_cbor``    SHA-256 of ``cbor2.dumps(obj, canonical=True)`` (lmcache's default; vLLM's)
``sha256``         SHA-256 of ``pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)``
``xxhash_cbor``    xxh3-128 digest of the canonical CBOR bytes
``xxhash``         xxh3-128 digest of the pickle bytes
``builtin``        Python's ``hash(obj)`` (int; may be negative)
=================  ===========================================================================

A digest is folded to LMCache's int ``chunk_hash`` by reading its first 8 bytes as a big-endian
unsigned int (LMCache's ``_normalize_hash_to_int``); ``builtin`` values stay as they are.

NONE_HASH (the chain's root) follows vLLM's ``init_none_hash``, which LMCache calls with its hash
function: the seed string is ``hash_seed`` (config) or else ``PYTHONHASHSEED``, and NONE_HASH is the
folded hash of that string; with no seed it is the folded hash of ``"vllm-none-hash"``. Where vLLM
(and hence LMCache) would take a root that is random per process — ``builtin`` with no seed (Python's
string hash is randomised) and ``xxhash``/``xxhash_cbor`` with no seed (vLLM draws a random seed) —
lmcache keeps a deterministic root so that disk and remote tiers still hit after a restart:
``builtin`` → 0, ``xxhash*`` → the folded hash of ``"vllm-none-hash"``. No value can match
LMCache's there. For ``builtin`` with a seed, the root is Python's ``hash(seed)`` as a process
started with ``PYTHONHASHSEED=<seed>`` computes it (SipHash-1-3 keyed as CPython keys it), whatever
this process's own ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import threading
from typing import Any, Callable, Optional

import cbor2

# Names accepted by ``make_hash_fn`` (vLLM 0.32's get_hash_fn_by_name names + LMCache's).
HASH_ALGORITHMS = ("sha256_cbor", "sha256", "xxhash_cbor", "xxhash", "builtin", "sha256_cbor_64bit")
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"  # vLLM 0.32 kv_cache_utils.DEFAULT_NONE_HASH_SEED
_RANDOM_ROOT_IN_VLLM = ("builtin", "xxhash", "xxhash_cbor")


def fold(value: int | bytes) -> int:
    """LMCache's int chunk hash: a digest's first 8 bytes as a big-endian unsigned int; an int
    (``builtin``) unchanged."""
    if isinstance(value, bytes):
        return int.from_bytes(value[:8], "big")
    return value


def _cbor(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _xxh3_128(data: bytes) -> bytes:
    import xxhash

    return xxhash.xxh3_128_digest(data)


def sha256_cbor(obj: Any) -> int:
    """First 8 bytes (big-endian, unsigned) of SHA-256 over canonical CBOR of ``obj``."""
    return fold(hashlib.sha256(_cbor(obj)).digest())


def sha256(obj: Any) -> int:
    """First 8 bytes (big-endian, unsigned) of SHA-256 over the pickle of ``obj``."""
    return fold(hashlib.sha256(_pickle(obj)).digest())


def xxhash_cbor(obj: Any) -> int:
    """First 8 bytes (big-endian, unsigned) of xxh3-128 over canonical CBOR of ``obj``."""
    return fold(_xxh3_128(_cbor(obj)))


def xxhash(obj: Any) -> int:
    """First 8 bytes (big-endian, unsigned) of xxh3-128 over the pickle of ``obj``."""
    return fold(_xxh3_128(_pickle(obj)))


def builtin(obj: Any) -> int:
    """Python's ``hash(obj)`` (a tuple of ints hashes the same under every PYTHONHASHSEED)."""
    return hash(obj)


_FUNCTIONS: dict[str, Callable[[Any], int]] = {
    "sha256_cbor": sha256_cbor, "sha256_cbor_64bit": sha256_cbor, "sha256": sha256,
    "xxhash_cbor": xxhash_cbor, "xxhash": xxhash, "builtin": builtin,
}


def make_hash_fn(name: str) -> Callable[[Any], int]:
    """The folded hash function named ``name`` (one of :data:`HASH_ALGORITHMS`).

    Raises:
        ValueError: unknown name (LMCache falls back to ``builtin`` with a warning; lmcache refuses).
    """
    try:
        return _FUNCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown hash algorithm {name!r}; expected one of {', '.join(HASH_ALGORITHMS)}"
        ) from None


def resolve_seed(seed: Optional[str]) -> Optional[str]:
    """The seed in force: ``seed`` if given, else ``PYTHONHASHSEED`` (None when unset)."""
    return seed if seed is not None else os.environ.get("PYTHONHASHSEED")


def none_hash(name: str, seed: Optional[str]) -> int:
    """NONE_HASH, the root of the chain, for algorithm ``name`` and seed string ``seed``
    (already resolved: pass :func:`resolve_seed`'s result; None = no seed). See the module
    docstring for the rule.

    Raises:
        ValueError: unknown name; a ``builtin`` seed that is not a PYTHONHASHSEED value
            (an int in [0, 4294967295] or ``"random"``).
        TypeError: seed is not a str or None.
    """
    fn = make_hash_fn(name)
    if seed is not None and not isinstance(seed, str):
        raise TypeError(f"hash seed must be a str or None, got {seed!r}")
    if name == "builtin":
        return 0 if seed is None else python_str_hash(seed)
    return fn(DEFAULT_NONE_HASH_SEED if seed is None else seed)


def python_str_hash(text: str, hash_seed: Optional[str] = None) -> int:
    """``hash(text)`` as CPython computes it in a process started with ``PYTHONHASHSEED=hash_seed``
    (default: ``text`` itself, vLLM's ``hash(PYTHONHASHSEED)``). Exact for CPython's SipHash-1-3 and
    str of code points < 256 (computed here, whatever this process's seed); otherwise taken from
    this process when its ``PYTHONHASHSEED`` is that seed.

    Raises:
        ValueError: the seed is "random" or not an int in [0, 4294967295] (Python refuses to start
            with such a PYTHONHASHSEED), or the value cannot be computed in this process.
    """
    seed_text = text if hash_seed is None else hash_seed
    if seed_text == "random":
        raise ValueError("builtin hash with PYTHONHASHSEED/hash_seed 'random' has a random root "
                         "per process; set an integer seed or use sha256_cbor")
    if not (seed_text.isascii() and seed_text.isdigit()) or int(seed_text) > 4294967295:
        raise ValueError(f"builtin hash seed {seed_text!r} is not a PYTHONHASHSEED value: expected "
                         f"an integer in [0, 4294967295]")
    if sys.hash_info.algorithm != "siphash13" or sys.hash_info.cutoff != 0 or \
            any(ord(ch) > 255 for ch in text):
        if os.environ.get("PYTHONHASHSEED") == seed_text:  # trust the environment we started in
            return hash(text)
        raise ValueError(f"cannot compute Python's hash of {text!r} under PYTHONHASHSEED={seed_text} "
                         f"in this process: start it with PYTHONHASHSEED={seed_text}")
    if not text:
        return 0
    secret = _hash_secret(int(seed_text))
    value = _siphash13(int.from_bytes(secret[:8], "little"), int.from_bytes(secret[8:16], "little"),
                       text.encode("latin-1"))
    value = value - (1 << 64) if value >= 1 << 63 else value
    return -2 if value == -1 else value


def _hash_secret(seed: int) -> bytes:
    """CPython's ``_Py_HashSecret`` bytes for PYTHONHASHSEED=``seed`` (zeros for 0, else lcg_urandom)."""
    if seed == 0:
        return bytes(24)
    out, x = bytearray(24), seed
    for i in range(24):
        x = (x * 214013 + 2531011) & 0xFFFFFFFF
        out[i] = (x >> 16) & 0xFF
    return bytes(out)


_M64 = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def _siphash13(k0: int, k1: int, data: bytes) -> int:
    """SipHash-1-3 as CPython's Python/pyhash.c computes it (unsigned 64-bit result)."""
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573

    def rnd(v0, v1, v2, v3):
        v0 = (v0 + v1) & _M64; v2 = (v2 + v3) & _M64  # noqa: E702
        v1 = _rotl(v1, 13) ^ v0; v3 = _rotl(v3, 16) ^ v2  # noqa: E702
        v0 = _rotl(v0, 32)
        v2 = (v2 + v1) & _M64; v0 = (v0 + v3) & _M64  # noqa: E702
        v1 = _rotl(v1, 17) ^ v2; v3 = _rotl(v3, 21) ^ v0  # noqa: E702
        v2 = _rotl(v2, 32)
        return v0, v1, v2, v3

    n = len(data)
    full = n - n % 8
    for i in range(0, full, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v3 ^= m
        v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
        v0 ^= m
    b = ((n & 0xFF) << 56) | int.from_bytes(data[full:], "little")
    v3 ^= b
    v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    return (v0 ^ v1) ^ (v2 ^ v3)


def random_root_in_lmcache(name: str, seed: Optional[str]) -> bool:
    """True where LMCache inside vLLM would take a random root per process (no seed and a
    non-cryptographic hash): lmcache's deterministic root cannot match LMCache's there."""
    return seed is None and name in _RANDOM_ROOT_IN_VLLM


# ---- vectorised CBOR chain (sha256_cbor / xxhash_cbor) -----------------------------------------
# The bytes hashed for chunk i are cbor2.dumps((parent, tuple(tokens), ()), canonical=True): an
# array of 3 (0x83), the parent's int, the tokens' array header, one int per token, and the empty
# array (0x80). Canonical CBOR writes every int in its shortest form, so all tokens can be encoded
# at once with numpy and each chunk hashed from a slice: bit for bit cbor2's bytes (tested).
_CBOR_DIGESTS = {"sha256_cbor": "sha256", "sha256_cbor_64bit": "sha256", "xxhash_cbor": "xxh3"}


def _cbor_head(major: int, value: int) -> bytes:
    """CBOR head of ``major`` type with argument ``value`` (0 <= value < 2**64), shortest form."""
    if value >= 1 << 32:  # a chain hash, mostly
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
    """Canonical CBOR of an int in [-2**64, 2**64) (what ``cbor2.dumps`` writes)."""
    return _cbor_head(0, value) if value >= 0 else _cbor_head(1, -1 - value)


def _keep_table():
    import numpy as np

    table = np.zeros((6, 5), dtype=bool)  # item length -> which of the 5 bytes are written
    table[:, 0] = True
    for size in (2, 3, 5):
        table[size, 6 - size:] = True
    return table


_KEEP = None


_WORK = threading.local()


def _workspace(n: int) -> dict:
    """Per-thread numpy arrays for ``_cbor_uints`` of up to ``n`` values, reused across calls
    (fresh memory costs page faults that take longer than the encoding on small hosts)."""
    import numpy as np

    ws = getattr(_WORK, "ws", None)
    if ws is None or ws["n"] < n:
        m = max(n, 4096)
        ws = _WORK.ws = {"n": m, "a": np.empty(m, np.uint32), "be": np.empty(m, ">u4"),
                         "t": np.empty(m, bool), "lens": np.empty(m, np.int64),
                         "mat": np.empty((m, 5), np.uint8), "keep": np.empty((m, 5), bool),
                         "data": np.empty(5 * m, np.uint8), "off": np.empty(m + 1, np.int64)}
    return ws


def _cbor_uints(values) -> tuple:
    """(bytes as a numpy uint8 array, int64 offsets [n + 1]) of the canonical CBOR of each of
    ``values`` (a 1-D numpy int64 array of values in [0, 2**32)), item i at
    ``[offsets[i], offsets[i+1])``: each value's 5-byte form (head, 4 big-endian bytes), of which
    the head and the last ``len - 1`` bytes are kept. The arrays are views of a per-thread
    workspace, valid until the next call on this thread."""
    import numpy as np

    global _KEEP
    if _KEEP is None:
        _KEEP = _keep_table()
    n = values.size
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
    return data, offsets


class CborTokens:
    """The canonical CBOR of every token of a sequence, encoded once (numpy), hashed chunk by
    chunk on demand: :meth:`chain` gives the values of :func:`make_hash_fn` ``(name)`` over
    ``(parent, tuple(chunk), ())``. Build with :meth:`build` (None when the fast path does not
    apply: another algorithm, a token < 0 or >= 2**32)."""

    def __init__(self, name: str, data, offsets, chunk_size: int) -> None:
        self._new = hashlib.sha256 if _CBOR_DIGESTS[name] == "sha256" else _xxh3_128_new()
        self._view = memoryview(data.tobytes())  # own copy: the workspace is reused
        self.chunk_size = chunk_size
        # byte offsets of the chunk boundaries (and of the end)
        self._bounds = offsets[::chunk_size].tolist() + [int(offsets[-1])]
        self._size = offsets.size - 1

    @classmethod
    def build(cls, name: str, tokens, chunk_size: int) -> Optional["CborTokens"]:
        """``tokens``: 1-D int tensor or numpy array, cut into ``chunk_size`` chunks from 0."""
        import numpy as np

        if name not in _CBOR_DIGESTS:
            return None
        arr = tokens.numpy() if hasattr(tokens, "numpy") else np.asarray(tokens)
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 1 << 32):
            return None
        return cls(name, *_cbor_uints(arr), chunk_size)

    def chain(self, parent: int, start: int, end: int) -> list[int]:
        """Hashes of the chunks of tokens ``[start, end)`` after ``parent`` (``start`` a chunk
        boundary; ``end`` one too, or the end of the tokens)."""
        c, bounds, view, new = self.chunk_size, self._bounds, self._view, self._new
        head = _cbor_head(4, c)
        out = []
        for b in range(start, end, c):
            e = min(b + c, end)
            stop = bounds[e // c] if e % c == 0 else bounds[-1]
            h = new(b"\x83" + cbor_int(parent) + (head if e - b == c else _cbor_head(4, e - b)))
            h.update(view[bounds[b // c]:stop])
            h.update(b"\x80")
            parent = int.from_bytes(h.digest()[:8], "big")
            out.append(parent)
        return out


def _xxh3_128_new():
    import xxhash as _xx

    return _xx.xxh3_128


def cbor_chain(name: str, parent: int, tokens, chunk_size: int, end: int) -> Optional[list[int]]:
    """The chain hashes of the chunks of ``tokens[:end]`` after ``parent`` (see
    :class:`CborTokens`); None when the fast path does not apply."""
    enc = CborTokens.build(name, tokens[:end], chunk_size)
    return None if enc is None else enc.chain(parent, 0, end)
