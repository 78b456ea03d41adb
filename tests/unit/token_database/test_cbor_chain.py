"""The vectorised canonical-CBOR chain (hashing.CborTokens) equals hashing a chunk at a time with
cbor2 (sha256_cbor, xxhash_cbor), for every CBOR int width, partial chunks, any parent."""

from __future__ import annotations

import random

import pytest
import torch

from lmcache.token_database.hashing import CborTokens, cbor_chain, sha256_cbor, xxhash_cbor

EDGES = [0, 1, 23, 24, 25, 255, 256, 257, 65535, 65536, 2**32 - 1, 127999]


@pytest.mark.parametrize("name, fn", [("sha256_cbor", sha256_cbor), ("xxhash_cbor", xxhash_cbor)])
def test_vectorised_chain_equals_cbor2(name, fn):
    rng = random.Random(11)
    for _ in range(30):
        n = rng.randint(1, 600)
        toks = [rng.choice(EDGES) if rng.random() < 0.5 else rng.randint(0, 2**rng.randint(1, 32) - 1)
                for _ in range(n)]
        c = rng.choice([1, 16, 23, 24, 256])
        end = n if rng.random() < 0.5 else n - n % c
        parent = rng.choice([0, 5, 30, 300, 70000, 2**64 - 1, 12345678901234])
        expected, p = [], parent
        for s in range(0, end, c):
            p = fn((p, tuple(toks[s:min(s + c, end)]), ()))
            expected.append(p)
        assert cbor_chain(name, parent, torch.tensor(toks), c, end) == expected


def test_resumed_ranges_equal_one_pass():
    toks = torch.randint(0, 128000, (1000,), generator=torch.Generator().manual_seed(1))
    enc = CborTokens.build("sha256_cbor", toks, 64)
    whole = enc.chain(7, 0, 1000)
    first = enc.chain(7, 0, 256)
    assert first + enc.chain(first[-1], 256, 1000) == whole


def test_fast_path_refuses_what_it_cannot_encode():
    assert CborTokens.build("sha256", torch.arange(4), 2) is None  # pickle-based algorithm
    assert CborTokens.build("sha256_cbor", torch.tensor([-1, 2]), 2) is None
    assert CborTokens.build("sha256_cbor", torch.tensor([2**32]), 1) is None


def test_an_encoding_survives_a_later_one_on_the_same_thread():
    a = torch.randint(0, 128000, (512,), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 128000, (512,), generator=torch.Generator().manual_seed(3))
    enc = CborTokens.build("sha256_cbor", a, 256)
    CborTokens.build("sha256_cbor", b, 256)  # reuses the per-thread workspace
    assert enc.chain(0, 0, 512) == cbor_chain("sha256_cbor", 0, a, 256, 512)
