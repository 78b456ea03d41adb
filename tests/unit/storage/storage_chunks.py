"""Chunks of the storage unit tests: one bf16 shape, deterministic values, keys of a prompt, and
the retrieve/poll helpers (importable as ``storage_chunks`` from this folder's tests)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lmcache.keys import CacheEngineKey
from lmcache.storage.policy import FIFOCachePolicy, LFUCachePolicy, LRUCachePolicy, MRUCachePolicy

SHAPE = (2, 2, 16, 32)  # [2, L, T, D] bf16: 4096 bytes per chunk
CHUNK = 4096
POLICIES = {"lru": LRUCachePolicy, "fifo": FIFOCachePolicy, "lfu": LFUCachePolicy,
            "mru": MRUCachePolicy}


def prompt(tag: int, n: int) -> list[CacheEngineKey]:
    """Keys of ``n`` chunks of the prompt ``tag`` (hashes ``tag << 8`` + i)."""
    return [CacheEngineKey("m", 1, 0, (tag << 8) + i, torch.bfloat16) for i in range(n)]


def value(i: int) -> torch.Tensor:
    """The bf16 chunk of seed ``i``, shape SHAPE."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)


def retrieve(sm, ks: list[CacheEngineKey], **kw) -> int:
    """``sm.batched_get(ks, **kw)``: how many leading chunks came back, each asserted equal to
    ``value(i)``; every returned reference is released."""
    got = sm.batched_get(ks, **kw)
    n = 0
    for i, obj in enumerate(got):
        if obj is None:
            break
        assert torch.equal(obj.tensor, value(i))
        n += 1
    for obj in got:
        if obj is not None:
            obj.ref_count_down()
    return n


def eventually(check: Callable[[], bool], tries: int = 400, delay: float = 0.025) -> bool:
    """Poll ``check`` until True (bounded: tries x delay); returns the last result."""
    for _ in range(tries):
        if check():
            return True
        time.sleep(delay)
    return check()
