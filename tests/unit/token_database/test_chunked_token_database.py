import json
from pathlib import Path

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.metadata import LMCacheMetadata
from lmcache.token_database import ChunkedTokenDatabase, TokenDatabase
from lmcache.token_database.hashing import make_hash_fn, none_hash, sha256_cbor

VECTORS = json.loads(Path("/work/shared/reference/hash_vectors.json").read_text())
CASES = VECTORS["token_database"]


def _id(c):
    return (f"{c['hash']}-seed{c['PYTHONHASHSEED']}-c{c['chunk_size']}-"
            f"unfull{c['save_unfull_chunk']}-n{len(c['tokens'])}")


def _md(chunk_size=16, model="meta-llama/Llama-3.1-8B"):
    return LMCacheMetadata(model, 2, 1, torch.bfloat16, (4, 2, chunk_size, 8, 128))


def _db(case, seed):
    return ChunkedTokenDatabase(
        _md(case["chunk_size"]), chunk_size=case["chunk_size"], hash_algorithm=case["hash"],
        save_unfull_chunk=case["save_unfull_chunk"], hash_seed=seed)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_reference_vectors_seed_by_constructor(case, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    db = _db(case, case["PYTHONHASHSEED"])
    assert db.none_hash == case["none_hash"]
    assert none_hash(case["hash"], case["PYTHONHASHSEED"]) == case["none_hash"]
    got = [list(t) for t in db.process_tokens(torch.tensor(case["tokens"], dtype=torch.long),
                                              make_key=False)]
    assert got == case["chunks"]
    # list input gives the same chunks
    assert [list(t) for t in db.process_tokens(case["tokens"], make_key=False)] == case["chunks"]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_reference_vectors_seed_by_env(case, monkeypatch):
    if case["PYTHONHASHSEED"] is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", case["PYTHONHASHSEED"])
    db = _db(case, None)
    assert db.none_hash == case["none_hash"]
    got = [list(t) for t in db.process_tokens(case["tokens"], make_key=False)]
    assert got == case["chunks"]


@pytest.mark.parametrize("case", [c for c in CASES if c["chunks"]][:8], ids=_id)
def test_keys_carry_reference_hashes(case, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    db = _db(case, case["PYTHONHASHSEED"])
    out = list(db.process_tokens(torch.tensor(case["tokens"]),
                                 request_configs={"lmcache.tag.user": "u@1", "other": "x"}))
    assert [(s, e) for s, e, _ in out] == [(s, e) for s, e, _ in case["chunks"]]
    for (_, _, key), (_, _, h) in zip(out, case["chunks"]):
        assert key == CacheEngineKey("meta-llama/Llama-3.1-8B", 2, 1, h, torch.bfloat16,
                                     (("user", "u@1"),))
        assert db.make_key(h, {"lmcache.tag.user": "u@1"}) == key


def test_hash_chain_formula():
    fn = make_hash_fn("sha256_cbor")
    toks = list(range(40))
    db = ChunkedTokenDatabase(_md(16), chunk_size=16, save_unfull_chunk=True, hash_seed="7")
    h0 = sha256_cbor("7")
    h1 = fn((h0, tuple(range(16)), ()))
    h2 = fn((h1, tuple(range(16, 32)), ()))
    h3 = fn((h2, tuple(range(32, 40)), ()))
    assert list(db.process_tokens(toks, make_key=False)) == [(0, 16, h1), (16, 32, h2),
                                                             (32, 40, h3)]
    assert make_hash_fn("builtin")((0, (1, 2), ())) == hash((0, (1, 2), ()))


def test_mask_skips_prefix_but_chains_hashes():
    db = ChunkedTokenDatabase(_md(16), chunk_size=16, save_unfull_chunk=True, hash_seed=None)
    toks = torch.arange(50)
    full = list(db.process_tokens(toks, make_key=False))
    mask = torch.ones(50, dtype=torch.bool)
    mask[:32] = False
    assert list(db.process_tokens(toks, mask=mask, make_key=False)) == full[2:]
    assert list(db.process_tokens(toks, mask=torch.zeros(50, dtype=torch.bool)[:50] | (
        torch.arange(50) >= 48), make_key=False)) == full[3:]


def test_mask_errors():
    db = ChunkedTokenDatabase(_md(16), chunk_size=16)
    toks = torch.arange(64)
    bad = torch.ones(64, dtype=torch.bool)
    bad[:20] = False
    with pytest.raises(ValueError, match=r"20 tokens.*chunk_size 16"):
        db.process_tokens(toks, mask=bad)
    with pytest.raises(ValueError, match="63 tokens|64 tokens"):
        db.process_tokens(toks, mask=torch.ones(63, dtype=torch.bool))
    holes = torch.ones(64, dtype=torch.bool)
    holes[40:] = False
    with pytest.raises(ValueError, match="False prefix"):
        db.process_tokens(toks, mask=holes)
    with pytest.raises(TypeError):
        db.process_tokens(toks, mask=torch.ones(64, dtype=torch.int64))


def test_unfull_chunk_only_when_enabled():
    toks = list(range(20))
    no = ChunkedTokenDatabase(_md(16), chunk_size=16, save_unfull_chunk=False)
    yes = ChunkedTokenDatabase(_md(16), chunk_size=16, save_unfull_chunk=True)
    assert [(s, e) for s, e, _ in no.process_tokens(toks)] == [(0, 16)]
    assert [(s, e) for s, e, _ in yes.process_tokens(toks)] == [(0, 16), (16, 20)]


def test_constructor_errors():
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkedTokenDatabase(_md(16), chunk_size=0)
    with pytest.raises(ValueError, match="differs"):
        ChunkedTokenDatabase(_md(16), chunk_size=256)
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        ChunkedTokenDatabase(_md(16), chunk_size=16, hash_algorithm="md5")
    db = ChunkedTokenDatabase(None, chunk_size=16)
    assert isinstance(db, TokenDatabase)
    assert len(list(db.process_tokens(range(32), make_key=False))) == 2
    with pytest.raises(ValueError, match="metadata"):
        db.process_tokens(range(32))
    with pytest.raises(ValueError, match="1-D"):
        db.process_tokens(torch.zeros(2, 16, dtype=torch.long), make_key=False)
    with pytest.raises(ValueError, match="integer"):
        db.process_tokens(torch.zeros(16), make_key=False)


def test_every_reference_case_is_checked():
    """The vectors cover both seeds of sha256_cbor (PYTHONHASHSEED '0' and unset: root
    11230124004819357437 = F(H('vllm-none-hash'))) and both of builtin (unset: root 0)."""
    roots = {(c["hash"], c["PYTHONHASHSEED"]): c["none_hash"] for c in CASES}
    assert roots[("sha256_cbor", None)] == 11230124004819357437 == sha256_cbor("vllm-none-hash")
    assert roots[("builtin", None)] == 0
    assert set(roots) == {("sha256_cbor", "0"), ("sha256_cbor", None), ("builtin", "0"),
                          ("builtin", None)}


def test_seed_changes_root_for_every_algorithm():
    for algo in ("sha256_cbor", "sha256", "xxhash_cbor", "xxhash", "builtin"):
        a = ChunkedTokenDatabase(None, chunk_size=16, hash_algorithm=algo, hash_seed="1")
        b = ChunkedTokenDatabase(None, chunk_size=16, hash_algorithm=algo, hash_seed="2")
        assert a.none_hash != b.none_hash, algo
        chunks_a = list(a.process_tokens(range(16), make_key=False))
        chunks_b = list(b.process_tokens(range(16), make_key=False))
        assert chunks_a != chunks_b, algo


def test_cache_salt_and_lora_enter_the_chain_as_vllm_extra_keys():
    """vLLM's generate_block_hash_extra_keys: ('lora', name, path) on every block,
    ('cache_salt', salt) on the first; plain requests keep LMCache's ()."""
    fn = make_hash_fn("sha256_cbor")
    db = ChunkedTokenDatabase(_md(16), chunk_size=16, hash_seed=None)
    toks = list(range(32))
    root = sha256_cbor("vllm-none-hash")
    plain = list(db.process_tokens(toks, make_key=False))
    salted = list(db.process_tokens(toks, make_key=False, request_configs={"vllm.cache_salt": "s1"}))
    other = list(db.process_tokens(toks, make_key=False, request_configs={"vllm.cache_salt": "s2"}))
    lora = {"vllm.lora_name": "ad", "vllm.lora_path": "/p"}
    both = list(db.process_tokens(toks, make_key=False, request_configs={**lora, "vllm.cache_salt": "s1"}))
    h1 = fn((root, tuple(range(16)), ()))
    assert plain == [(0, 16, h1), (16, 32, fn((h1, tuple(range(16, 32)), ())))]
    s1 = fn((root, tuple(range(16)), (("cache_salt", "s1"),)))
    assert salted == [(0, 16, s1), (16, 32, fn((s1, tuple(range(16, 32)), ())))]
    lo = ("lora", "ad", "/p")
    b1 = fn((root, tuple(range(16)), (lo, ("cache_salt", "s1"))))
    assert both == [(0, 16, b1), (16, 32, fn((b1, tuple(range(16, 32)), (lo,))))]
    hashes = [{h for _, _, h in x} for x in (plain, salted, other, both)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not hashes[i] & hashes[j]
    # an empty salt is no salt (vLLM: `if request.cache_salt`); tags never change hashes
    assert list(db.process_tokens(toks, make_key=False, request_configs={"vllm.cache_salt": ""})) == plain
    assert list(db.process_tokens(toks, make_key=False, request_configs={"lmcache.tag.u": "x"})) == plain
    with pytest.raises(ValueError, match="vllm.lora_path"):
        db.process_tokens(toks, request_configs={"vllm.lora_path": "/p"})


def test_mla_keys_are_the_first_ranks_on_every_rank():
    """LMCache's save_only_first_rank (default on for MLA): world_size 1 in the key, so TP=2
    ranks and a TP=1 instance name each chunk alike."""
    def md(ws, wid, mla=True):
        return LMCacheMetadata("ds", ws, wid, torch.bfloat16, (2, 1 if mla else 2, 16, 1, 576), mla)

    toks = list(range(32))
    keys = {}
    for ws, wid in ((2, 0), (2, 1), (1, 0)):
        db = ChunkedTokenDatabase(md(ws, wid), chunk_size=16)
        keys[(ws, wid)] = [k.to_string() for _, _, k in db.process_tokens(toks)]
    assert keys[(2, 0)] == keys[(2, 1)] == keys[(1, 0)]
    assert all(k.startswith("ds@1@0@") for k in keys[(1, 0)])
    off = ChunkedTokenDatabase(md(2, 1), chunk_size=16, save_only_first_rank=False)
    assert all(k.startswith("ds@2@1@") for _, _, k in
               ((s, e, k.to_string()) for s, e, k in off.process_tokens(toks)))
    plain = ChunkedTokenDatabase(md(2, 1, mla=False), chunk_size=16, save_only_first_rank=True)
    assert not plain.save_only_first_rank  # only MLA, as in LMCache
    assert all(k.to_string().startswith("ds@2@1@") for _, _, k in plain.process_tokens(toks))
