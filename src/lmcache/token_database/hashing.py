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

The sha256_cbor / xxhash_cbor chain over a whole prompt at once (every token CBOR-encoded in one
pass, the same values): :mod:`lmcache.token_database.cbor_chain`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
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
