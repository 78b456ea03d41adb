"""The vectorised canonical-CBOR chain (hashing.CborTokens) equals hashing a chunk at a time with
cbor2 (sha256_cbor, xxhash_cbor), for every CBOR int width, partial chunks, any parent."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import cbor2
import numpy as np
import pytest
import torch

from lmcache.token_database.cbor_chain import (
    JIT_MIN_TOKENS,
    CborTokens,
    cbor_chain,
    enable_compiled_encoder,
    encode_jit,
    encode_numpy,
)
from lmcache.token_database.chunked import ChunkedTokenDatabase
from lmcache.token_database.hashing import sha256_cbor, xxhash_cbor

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


# ---- the two encoders (numpy, compiled) against cbor2's bytes -------------------------------
CBOR_EDGES = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1]


# The compiled encoder must not be loaded in this pytest process (vLLM engines start here later,
# and importing numba breaks their start: see cbor_chain's docstring). Its tests run in a child
# pytest of this file with COMPILED set: test_compiled_encoder_in_a_process_of_its_own.
COMPILED = os.environ.get("LMCACHE_TEST_COMPILED_CBOR") == "1"


def _encoders():
    out = [("numpy", encode_numpy)]
    if COMPILED:
        assert enable_compiled_encoder() is not None, "numba is a dependency: it must compile"
        out.append(("jit", encode_jit))
    return out


def _random_values(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    widths = rng.integers(1, 33, n)  # every CBOR int width, evenly
    vals = rng.integers(0, 2**32, n, dtype=np.int64) >> (32 - widths)
    edges = rng.random(n) < 0.1
    vals[edges] = rng.choice(CBOR_EDGES, int(edges.sum()))
    return vals


@pytest.mark.parametrize("enc_name, enc", _encoders())
def test_encoders_write_cbor2s_canonical_bytes(enc_name, enc):
    for v in CBOR_EDGES:  # each edge value alone: exactly cbor2's bytes
        data, bounds = enc(np.array([v], np.int64), 1)
        assert data.tobytes() == cbor2.dumps(v, canonical=True), (enc_name, v)
        assert bounds.tolist() == [0, len(cbor2.dumps(v, canonical=True))]
    for seed, n, c in ((0, 1, 1), (1, 300, 7), (2, 5000, 256), (3, 4096, 256)):
        vals = _random_values(seed, n)
        vals[:len(CBOR_EDGES)] = CBOR_EDGES[:n]
        data, bounds = enc(vals, c)
        items = [cbor2.dumps(int(v), canonical=True) for v in vals]
        assert data.tobytes() == b"".join(items)
        # a whole chunk as cbor2 writes the tuple: array head + these bytes
        assert cbor2.dumps(tuple(int(v) for v in vals[:c]), canonical=True) == \
            _array_head(min(c, n)) + data.tobytes()[:bounds[1]]
        ends = np.cumsum([len(b) for b in items])
        assert bounds.tolist() == [0] + [int(ends[min(s + c, n) - 1]) for s in range(0, n, c)]


def _array_head(n: int) -> bytes:
    return cbor2.dumps([0] * n, canonical=True)[:-n]


@pytest.mark.parametrize("enc_name, enc", _encoders())
def test_encoders_refuse_what_cbor2_must_encode(enc_name, enc):
    for bad in ([2**32], [5, -1], [2**40, 1]):
        assert enc(np.array(bad, np.int64), 2) is None, (enc_name, bad)


if COMPILED:
    def test_jit_and_numpy_encoders_agree_on_a_long_prompt():
        _jit_and_numpy_agree()
else:
    def test_compiled_encoder_in_a_process_of_its_own():
        """Every encoder test of this file again, with the compiled encoder switched on, in a
        child pytest (5 jit variants and the long-prompt comparison; the database then takes it from
        JIT_MIN_TOKENS tokens)."""
        env = dict(os.environ, LMCACHE_TEST_COMPILED_CBOR="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", __file__, "-v", "-p", "no:cacheprovider"],
            env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        passed = [ln for ln in proc.stdout.splitlines() if ln.endswith("PASSED") or " PASSED " in ln]
        assert sum("jit" in ln for ln in passed) == 5, proc.stdout[-3000:]
        assert "SKIPPED" not in proc.stdout and "FAILED" not in proc.stdout

    def test_long_prompt_hashing_leaves_numba_unloaded():
        """A 20k-token prompt hashed in a fresh process (as in a vLLM worker) takes the numpy
        encoder: llvmlite, which vLLM's worker start trips on, is never imported."""
        code = ("import sys, torch; from lmcache.token_database.chunked import "
                "ChunkedTokenDatabase as D; d = D(None, chunk_size=256, "
                "hash_algorithm='sha256_cbor'); "
                "h = [x for _, _, x in d.process_tokens(list(range(20000)), make_key=False)]; "
                "print(len(h), 'llvmlite' in sys.modules, 'numba' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, timeout=300).stdout.split()
        assert out == ["78", "False", "False"]


def _jit_and_numpy_agree():
    vals = torch.randint(0, 152064, (70000,), generator=torch.Generator().manual_seed(5)).numpy()
    d1, b1 = encode_numpy(vals, 256)
    d1 = d1.copy()
    d2, b2 = encode_jit(vals, 256)
    assert d1.tobytes() == d2.tobytes() and b1.tolist() == b2.tolist()


@pytest.mark.parametrize("name, fn", [("sha256_cbor", sha256_cbor), ("xxhash_cbor", xxhash_cbor)])
@pytest.mark.parametrize("enc_name, enc", _encoders())
def test_chain_from_each_encoder_equals_cbor2(name, fn, enc_name, enc):
    toks = _random_values(7, 1000)
    for c, end in ((256, 1000), (256, 768), (23, 1000)):
        parent, expected = 2**64 - 1, []
        for s in range(0, end, c):
            parent = fn((parent, tuple(int(t) for t in toks[s:min(s + c, end)]), ()))
            expected.append(parent)
        got = CborTokens(name, *enc(toks[:end], c), c).chain(2**64 - 1, 0, end)
        assert got == expected, (enc_name, c, end)


def test_token_database_hashes_2_pow_32_as_cbor2_does():
    """A token the fast path refuses (>= 2**32) is hashed by cbor2 per chunk: same values."""
    toks = [1, 2**32, 24, 65536]
    db = ChunkedTokenDatabase(None, chunk_size=2, hash_algorithm="sha256_cbor")
    got = [h for _, _, h in db.process_tokens(toks, make_key=False)]
    p1 = sha256_cbor((db.none_hash, (1, 2**32), ()))
    assert got == [p1, sha256_cbor((p1, (24, 65536), ()))]


def test_long_prompt_through_the_token_database_equals_cbor2():
    """From JIT_MIN_TOKENS tokens the database takes the compiled encoder (when numba is
    there): its chain equals cbor2's, chunk by chunk."""
    n = JIT_MIN_TOKENS + 300
    toks = torch.randint(0, 128256, (n,), generator=torch.Generator().manual_seed(9))
    db = ChunkedTokenDatabase(None, chunk_size=256, hash_algorithm="sha256_cbor",
                              save_unfull_chunk=True)
    got = [h for _, _, h in db.process_tokens(toks.tolist(), make_key=False)]
    values, parent, expected = toks.tolist(), db.none_hash, []
    for s in range(0, n, 256):
        parent = sha256_cbor((parent, tuple(values[s:s + 256]), ()))
        expected.append(parent)
    assert got == expected
