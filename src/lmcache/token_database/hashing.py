"""Chunk hash functions of the prefix-hash chain (DESIGN.md §4.2).

``sha256_cbor`` (vLLM's and LMCache's default): H(obj) = SHA-256 of
``cbor2.dumps(obj, canonical=True)``, folded to an int by taking the first 8 digest bytes as a
big-endian unsigned integer (LMCache's int chunk_hash). ``builtin``: Python's ``hash(obj)``
(deterministic for tuples of ints, independent of PYTHONHASHSEED).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional

import cbor2

HASH_ALGORITHMS = ("sha256_cbor", "builtin")


def sha256_cbor(obj: object) -> int:
    """First 8 bytes (big-endian, unsigned) of SHA-256 over canonical CBOR of ``obj``."""
    digest = hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()
    return int.from_bytes(digest[:8], "big")


def _builtin(obj: object) -> int:
    return hash(obj)


def make_hash_fn(name: str) -> Callable[[object], int]:
    """The hash function named ``name`` ("sha256_cbor" or "builtin").

    Raises:
        ValueError: unknown name.
    """
    if name == "sha256_cbor":
        return sha256_cbor
    if name == "builtin":
        return _builtin
    raise ValueError(f"unknown hash algorithm {name!r}; expected one of {HASH_ALGORITHMS}")


def none_hash(name: str, seed: Optional[str]) -> int:
    """NONE_HASH, the root of the chain.

    sha256_cbor: 0 when ``seed`` is None, else sha256_cbor(seed) (the seed string itself is
    CBOR-encoded, as vLLM's ``init_none_hash`` does). builtin: always 0.

    Raises:
        ValueError: unknown name; TypeError: seed is not a str.
    """
    make_hash_fn(name)  # validates the name
    if seed is not None and not isinstance(seed, str):
        raise TypeError(f"hash seed must be a str or None, got {seed!r}")
    if name == "builtin" or seed is None:
        return 0
    return sha256_cbor(seed)
