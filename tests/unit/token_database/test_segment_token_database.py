import hashlib

import cbor2
import pytest
import torch

from lmcache.config import compose_config
from lmcache.containers import build
from lmcache.experiments.trained_model import tiny_model_path
from lmcache.keys import CacheEngineKey
from lmcache.metadata import LMCacheMetadata
from lmcache.token_database import ChunkedTokenDatabase
from lmcache.token_database.hashing import none_hash
from lmcache.token_database.segment import SegmentTokenDatabase

SEP = [223, 5, 223, 5, 223]  # " # # " in the trained tiny model's tokenizer
ROOT = none_hash("sha256_cbor", "0")


def _md(model="tiny", use_mla=False):
    return LMCacheMetadata(model, 2, 1, torch.float32, (4, 1 if use_mla else 2, 16, 2, 64),
                           use_mla=use_mla)


def _db(**kw):
    kw.setdefault("separator_tokens", SEP)
    kw.setdefault("hash_seed", "0")
    return SegmentTokenDatabase(_md(), **kw)


def _sha(obj):
    return int.from_bytes(hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()[:8], "big")


SYS, DOC_A, DOC_B, Q = [1, 40, 41], [300, 301, 302, 303], [500, 501], [700, 701, 702]


def test_segments_offsets_and_exact_keys():
    tokens = SYS + SEP + DOC_A + SEP + DOC_B + SEP + Q
    out = list(_db().process_tokens(torch.tensor(tokens), make_key=False))
    assert [(s, e) for s, e, _ in out] == [(0, 3), (8, 12), (17, 19), (24, 27)]
    assert [tokens[s:e] for s, e, _ in out] == [SYS, DOC_A, DOC_B, Q]
    assert [h for _, _, h in out] == [_sha((ROOT, tuple(seg), ())) for seg in (SYS, DOC_A, DOC_B, Q)]
    keys = list(_db().process_tokens(tokens))
    assert keys[1] == (8, 12, CacheEngineKey("tiny", 2, 1, out[1][2], torch.float32, ()))


def test_same_document_at_two_positions_has_one_key():
    db = _db()
    first = dict(((s, e), h) for s, e, h in db.process_tokens(
        SYS + SEP + DOC_A + SEP + DOC_B + SEP + Q, make_key=False))
    second = dict(((s, e), h) for s, e, h in db.process_tokens(
        SYS + SEP + DOC_B + SEP + DOC_A + SEP + Q, make_key=False))
    assert first[(8, 12)] == second[(15, 19)]   # DOC_A moved from 8 to 15
    assert first[(17, 19)] == second[(8, 10)]   # DOC_B moved from 17 to 8
    assert first[(8, 12)] != first[(17, 19)]


def test_segment_hash_equals_chunked_first_chunk():
    """A segment's hash is the chunked database's hash of a first chunk of the same tokens
    (same hash function and NONE_HASH), hence LMCache's segment hash."""
    chunked = ChunkedTokenDatabase(None, chunk_size=len(DOC_A), hash_seed="0")
    (_, _, want), = chunked.process_tokens(DOC_A, make_key=False)
    assert _db().segment_hash(DOC_A) == want
    for algo in ("sha256", "xxhash_cbor", "builtin"):
        c = ChunkedTokenDatabase(None, chunk_size=len(DOC_B), hash_algorithm=algo, hash_seed="7")
        s = SegmentTokenDatabase(None, separator_tokens=SEP, hash_algorithm=algo, hash_seed="7")
        assert [h for *_, h in s.process_tokens(DOC_B, make_key=False)] == \
            [h for *_, h in c.process_tokens(DOC_B, make_key=False)]


def test_edges_empty_segments_and_no_separator():
    db = _db()
    assert db.split(DOC_A) == [(0, 4)]
    assert db.split(SEP + DOC_A + SEP + SEP + DOC_B + SEP) == [(5, 9), (19, 21)]
    assert db.split(SEP) == [] and db.split([]) == []
    assert db.split(SEP[:3]) == [(0, 3)]                 # shorter than the separator
    assert db.split(SEP[:2] + [9] + SEP + [9]) == [(0, 3), (8, 9)]  # partial match, real one
    overlap = SegmentTokenDatabase(None, separator_tokens=[7, 7], hash_seed="0")
    assert overlap.split([1, 7, 7, 7, 2]) == [(0, 1), (3, 5)]  # left to right, no overlap


def test_mask_skips_segments_starting_in_the_prefix():
    tokens = SYS + SEP + DOC_A + SEP + Q
    db = _db()
    mask = torch.tensor([False] * 9 + [True] * (len(tokens) - 9))
    assert [(s, e) for s, e, _ in db.process_tokens(tokens, mask=mask, make_key=False)] == \
        [(17, 20)]  # DOC_A starts at 8 < 9: skipped although it ends after 9
    mask = torch.tensor([False] * 8 + [True] * (len(tokens) - 8))
    assert [(s, e) for s, e, _ in db.process_tokens(tokens, mask=mask, make_key=False)] == \
        [(8, 12), (17, 20)]
    with pytest.raises(ValueError, match="False prefix followed only by True"):
        list(db.process_tokens(tokens, mask=torch.tensor([True, False] + [True] * 18)))


def test_tags_salt_and_lora_enter_keys():
    db = _db()
    plain = list(db.process_tokens(DOC_A))[0][2]
    tagged = list(db.process_tokens(DOC_A, request_configs={"lmcache.tag.user": "u1"}))[0][2]
    assert tagged.chunk_hash == plain.chunk_hash and tagged.request_configs == (("user", "u1"),)
    salted = list(db.process_tokens(SYS + SEP + DOC_A, make_key=False,
                                    request_configs={"vllm.cache_salt": "s"}))
    assert salted[1][2] == _sha((ROOT, tuple(DOC_A), (("cache_salt", "s"),)))  # every segment
    lora = list(db.process_tokens(DOC_A, make_key=False,
                                  request_configs={"vllm.lora_name": "a", "vllm.lora_path": "/p"}))
    assert lora[0][2] == _sha((ROOT, tuple(DOC_A), (("lora", "a", "/p"),)))


def test_mla_keys_first_rank():
    db = SegmentTokenDatabase(_md(use_mla=True), separator_tokens=SEP, hash_seed="0")
    key = list(db.process_tokens(DOC_A))[0][2]
    assert (key.world_size, key.worker_id) == (1, 0)


def test_bad_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="has no tokens"):
        SegmentTokenDatabase(None, separator_tokens=[])
    with pytest.raises(ValueError, match="must be ints"):
        SegmentTokenDatabase(None, separator_tokens=["#"])
    with pytest.raises(ValueError, match="non-empty str"):
        SegmentTokenDatabase(None, blend_special_str="", tokenizer=lambda s: [1])
    with pytest.raises(ValueError, match="needs separator_tokens, a tokenizer or metadata"):
        SegmentTokenDatabase(None)
    with pytest.raises(ValueError, match="unknown hash algorithm 'md5'"):
        SegmentTokenDatabase(None, separator_tokens=SEP, hash_algorithm="md5")
    db = SegmentTokenDatabase(None, separator_tokens=SEP)
    with pytest.raises(ValueError, match="without metadata cannot make keys"):
        db.process_tokens(DOC_A)
    with pytest.raises(ValueError, match="1-D tensor"):
        db.process_tokens(torch.zeros(2, 2, dtype=torch.long), make_key=False)


def test_tokenizer_callable_and_config_option_with_model_tokenizer():
    db = SegmentTokenDatabase(None, tokenizer=lambda s: [ord(c) for c in s], hash_seed="0")
    assert db.sep_tokens == (32, 35, 32, 35, 32)
    model = str(tiny_model_path("trained"))
    cfg = compose_config(["token_database=segment"])
    built = build(cfg.token_database, metadata=_md(model))
    assert isinstance(built, SegmentTokenDatabase)
    assert built.sep_tokens == tuple(SEP) and built.blend_special_str == " # # "
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    docs = ["The licensor grants you", "Permission is hereby granted", "What is granted?"]
    ids = [tok.encode(d, add_special_tokens=False) for d in docs]
    prompt = ids[0] + SEP + ids[1] + SEP + ids[2]
    spans = [(s, e) for s, e, _ in built.process_tokens(prompt, make_key=False)]
    assert [prompt[s:e] for s, e in spans] == ids
