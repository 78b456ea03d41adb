"""Hash functions and NONE_HASH against vLLM 0.32's own (vllm.utils.hashing, init_none_hash)."""

import subprocess
import sys

import pytest

from lmcache.token_database.hashing import (
    DEFAULT_NONE_HASH_SEED,
    HASH_ALGORITHMS,
    fold,
    make_hash_fn,
    none_hash,
    python_str_hash,
)

vllm_hashing = pytest.importorskip("vllm.utils.hashing")
kv_cache_utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")

VLLM_NAMES = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
OBJS = [(11230124004819357437, tuple(range(16)), ()), (0, (1, 2, 3), ()), "0", "vllm-none-hash",
        (-5, tuple(range(300)), (("cache_salt", "s"),)), (2**64 - 1, (), (("lora", "a", "/p"),))]


def test_every_vllm_name_is_accepted():
    for name in VLLM_NAMES:
        vllm_hashing.get_hash_fn_by_name(name)  # vLLM accepts it ...
        assert name in HASH_ALGORITHMS          # ... and so does lmcache
    with pytest.raises(ValueError):
        vllm_hashing.get_hash_fn_by_name("md5")
    with pytest.raises(ValueError, match="'md5'"):
        make_hash_fn("md5")


@pytest.mark.parametrize("name", VLLM_NAMES)
def test_values_equal_vllms_folded(name):
    ours, theirs = make_hash_fn(name), vllm_hashing.get_hash_fn_by_name(name)
    for obj in OBJS:
        assert ours(obj) == fold(theirs(obj)) == int.from_bytes(theirs(obj)[:8], "big")
    assert make_hash_fn("sha256_cbor_64bit") is make_hash_fn("sha256_cbor")  # LMCache's old name


@pytest.mark.parametrize("name", VLLM_NAMES)
@pytest.mark.parametrize("seed", ["0", "12345", "abc"])
def test_seeded_root_equals_vllms_init_none_hash(name, seed, monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", seed)
    kv_cache_utils.init_none_hash(vllm_hashing.get_hash_fn_by_name(name))
    assert none_hash(name, seed) == fold(kv_cache_utils.NONE_HASH)


@pytest.mark.parametrize("name", ["sha256", "sha256_cbor"])
def test_unseeded_root_equals_vllms_for_cryptographic_hashes(name, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    kv_cache_utils.init_none_hash(vllm_hashing.get_hash_fn_by_name(name))
    assert none_hash(name, None) == fold(kv_cache_utils.NONE_HASH)


@pytest.mark.parametrize("name", ["xxhash", "xxhash_cbor"])
def test_unseeded_xxhash_root_is_deterministic(name):
    """vLLM draws a random seed here; lmcache keeps F(H('vllm-none-hash')) across processes."""
    assert none_hash(name, None) == fold(vllm_hashing.get_hash_fn_by_name(name)(DEFAULT_NONE_HASH_SEED))


def test_builtin_root_is_pythons_hash_of_the_seed_under_that_seed():
    """LMCache's builtin root with PYTHONHASHSEED=s is hash(s) in that process; lmcache computes
    it in any process (checked against real interpreters started with each seed)."""
    seeds = ["0", "1", "42", "4294967295", "123456789"]
    for seed in seeds:
        out = subprocess.run([sys.executable, "-c", "import sys; print(hash(sys.argv[1]))", seed],
                             env={"PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True)
        assert none_hash("builtin", seed) == int(out.stdout) == python_str_hash(seed)
    assert none_hash("builtin", None) == 0
    assert make_hash_fn("builtin")((0, (1, 2), ())) == hash((0, (1, 2), ()))


@pytest.mark.parametrize("seed", ["random", "-1", "4294967296", " 1", "abc", "1.0"])
def test_builtin_seed_must_be_a_pythonhashseed(seed):
    with pytest.raises(ValueError, match="PYTHONHASHSEED|random"):
        none_hash("builtin", seed)
