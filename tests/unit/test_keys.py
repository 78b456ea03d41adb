import json
import pickle
import random
from pathlib import Path

import pytest
import torch

from lmcache.keys import CacheEngineKey, LayerCacheEngineKey, dtype_to_name, name_to_dtype

VECTORS = json.loads(Path("/work/shared/reference/hash_vectors.json").read_text())


def _dtype(s: str) -> torch.dtype:
    return getattr(torch, s.split(".", 1)[1])


@pytest.mark.parametrize("case", VECTORS["keys"], ids=lambda c: c["string"])
def test_reference_key_strings(case):
    key = CacheEngineKey(
        case["model_name"], case["world_size"], case["worker_id"], case["chunk_hash"],
        _dtype(case["dtype"]), tuple(case["request_configs"] or ()),
    )
    assert key.to_string() == case["string"]
    assert key.split_layers(3)[2].to_string() == case["layer_2_string"]
    assert CacheEngineKey.from_string(case["string"]) == key
    layer = CacheEngineKey.from_string(case["layer_2_string"])
    assert isinstance(layer, LayerCacheEngineKey) and layer.layer_id == 2
    assert layer == key.split_layers(3)[2]
    assert layer.to_chunk_key() == key


def test_string_format_and_negative_hash():
    key = CacheEngineKey("m", 2, 1, -255, torch.float16)
    assert key.to_string() == "m@2@1@-ff@half"
    assert CacheEngineKey.from_string("m@2@1@-ff@half").chunk_hash == -255
    assert CacheEngineKey("m", 1, 0, 0, torch.float32).to_string() == "m@1@0@0@float"


def test_tags_in_insertion_order_escaped_and_after_layer():
    key = CacheEngineKey("a@b%c", 1, 0, 16, torch.bfloat16, (("zz", "v@1"), ("aa", "50%")))
    assert key.request_configs == (("zz", "v@1"), ("aa", "50%"))
    s = key.to_string()
    assert s == "a%40b%25c@1@0@10@bfloat16@zz%v%401@aa%50%25"
    assert CacheEngineKey.from_string(s) == key
    assert key.split_layers(2)[1].to_string() == "a%40b%25c@1@0@10@bfloat16@1@zz%v%401@aa%50%25"
    assert key.tags == {"aa": "50%", "zz": "v@1"}


def test_lmcache_request_configs_dict_gives_lmcache_tags():
    """LMCache 0.5.6 (lmcache/utils.py CacheEngineKey): only ``lmcache.tag.*`` entries are tags,
    written in insertion order."""
    key = CacheEngineKey("meta-llama/Llama-3.1-8B", 1, 0, 0xb8a960cfcc69e7a5, torch.bfloat16,
                         request_configs={"lmcache.tag.user": "alice"})
    assert key.to_string() == "meta-llama/Llama-3.1-8B@1@0@b8a960cfcc69e7a5@bfloat16@user%alice"
    mixed = {"lmcache.tag.zone": "eu", "lmcache.other": "x", "lmcache.tag.user": "bob", "t": "y",
             "lmcache.tag.n": 7}
    key = CacheEngineKey("m", 1, 0, 1, torch.half, mixed)
    assert key.request_configs == (("zone", "eu"), ("user", "bob"), ("n", "7"))
    assert key.to_string() == "m@1@0@1@half@zone%eu@user%bob@n%7"
    assert CacheEngineKey("m", 1, 0, 1, torch.half, {"a": "1"}).to_string() == "m@1@0@1@half"


def test_parser_accepts_any_tag_order_and_keeps_it():
    a = CacheEngineKey.from_string("m@1@0@ff@half@b%1@a%2")
    b = CacheEngineKey.from_string("m@1@0@ff@half@a%2@b%1")
    assert a.tags == b.tags == {"a": "2", "b": "1"}
    assert a.to_string() == "m@1@0@ff@half@b%1@a%2" and b.to_string() == "m@1@0@ff@half@a%2@b%1"
    layer = LayerCacheEngineKey.from_string("m@1@0@ff@half@3@b%1@a%2")
    assert layer.layer_id == 3 and layer.request_configs == (("b", "1"), ("a", "2"))


def _random_name(rng: random.Random) -> str:
    alphabet = "ab/@%-_.:é漢😀 9%40%25"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))


NAMES = ["meta-llama/Llama-3.1-8B", "org/model@v2", "100%", "%40", "%25%40@@%%", "ünïcødé/模型",
         "a/b/c", "@", "%"] + [_random_name(random.Random(i)) for i in range(40)]


@pytest.mark.parametrize("model_name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.bool])
def test_round_trip_property(model_name, dtype):
    rng = random.Random(model_name)
    tags = tuple((f"t{i}", _random_name(rng)) for i in range(rng.randint(0, 3)))
    h = rng.randint(-(2**63), 2**64 - 1)
    key = CacheEngineKey(model_name, 4, 3, h, dtype, tags)
    s = key.to_string()
    assert s.count("@") == 4 + len(tags)  # escaping removes every '@' from names and values
    assert CacheEngineKey.from_string(s) == key
    for layer in key.split_layers(2):
        assert CacheEngineKey.from_string(layer.to_string()) == layer
        assert LayerCacheEngineKey.from_string(layer.to_string()) == layer


def test_slash_kept_as_is():
    assert CacheEngineKey("a/b", 1, 0, 1, torch.half).to_string().startswith("a/b@")


def test_keys_hashable_equal_and_picklable():
    a = CacheEngineKey("m", 1, 0, 5, torch.half, (("t", "x"),))
    b = CacheEngineKey("m", 1, 0, 5, torch.half, {"lmcache.tag.t": "x"})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != a.with_hash(6) and a.with_hash(6).chunk_hash == 6
    assert pickle.loads(pickle.dumps(a)) == a
    layer = a.split_layers(1)[0]
    assert layer != a
    assert layer.with_hash(9) == LayerCacheEngineKey("m", 1, 0, 9, torch.half, (("t", "x"),), 0)


@pytest.mark.parametrize("bad", [
    dict(model_name=""), dict(world_size=0), dict(worker_id=1), dict(worker_id=-1),
    dict(chunk_hash=1.5), dict(dtype=torch.complex64),
    dict(request_configs=(("a@b", "v"),)), dict(request_configs=(("a%b", "v"),)),
    dict(request_configs=(("", "v"),)), dict(request_configs=(("a", 1),)),
])
def test_bad_fields_rejected(bad):
    fields = dict(model_name="m", world_size=1, worker_id=0, chunk_hash=1, dtype=torch.half)
    fields.update(bad)
    with pytest.raises((ValueError, TypeError)):
        CacheEngineKey(**fields)


def test_layer_key_requires_layer_id():
    with pytest.raises(ValueError, match="layer_id"):
        LayerCacheEngineKey("m", 1, 0, 1, torch.half)
    with pytest.raises(TypeError):
        LayerCacheEngineKey("m", 1, 0, 1, torch.half, layer_id=0).split_layers(2)
    with pytest.raises(ValueError):
        CacheEngineKey("m", 1, 0, 1, torch.half).split_layers(0)


NON_CANONICAL = [
    "m@1@0@ff", "m@1@0@0xff@half", "m@1@0@FF@half", "m@1@0@Ff@half", "m@x@0@ff@half",
    "m@1@0@ff@float32", "m%@1@0@ff@half", "m@1@0@ff@half@x", "m@1@0@ff@half@t%v%4",
    # ints: sign, spaces, leading zeros, non-ASCII digits, empty
    "m@+1@0@ff@half", "m@ 1@0@ff@half", "m@1 @0@ff@half", "m@01@0@ff@half", "m@1@00@ff@half",
    "m@1@-0@ff@half", "m@\u0661@0@ff@half", "m@@0@ff@half", "m@1@@ff@half", "m@2@2@ff@half",
    # hashes: sign, leading zeros, -0, spaces, empty, underscores
    "m@1@0@+ff@half", "m@1@0@0ff@half", "m@1@0@-0@half", "m@1@0@-0ff@half", "m@1@0@ f@half",
    "m@1@0@@half", "m@1@0@f_f@half", "m@1@0@--f@half",
    # dtype and trailing junk
    "m@1@0@ff@half ", "m@1@0@ff@Half", "m@1@0@ff@torch.float16", "m@1@0@ff@half@",
    "m@1@0@ff@half\n", "@1@0@ff@half",
    # layer ids
    "m@1@0@ff@half@+1", "m@1@0@ff@half@01", "m@1@0@ff@half@ 1", "m@1@0@ff@half@1@2",
    "m@1@0@ff@half@-1", "m@1@0@ff@half@0x1",
    # tags: bad escapes, duplicates, empty names
    "m@1@0@ff@half@t%a%2", "m@1@0@ff@half@t%1@t%2", "m@1@0@ff@half@%v",
]


@pytest.mark.parametrize("bad", [b.encode().decode("unicode_escape") for b in NON_CANONICAL])
def test_from_string_accepts_only_canonical_input(bad):
    with pytest.raises(ValueError) as info:
        CacheEngineKey.from_string(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [b.encode().decode("unicode_escape") for b in NON_CANONICAL
                                 if b.count("@") >= 5])
def test_layer_from_string_accepts_only_canonical_input(bad):
    with pytest.raises(ValueError) as info:
        LayerCacheEngineKey.from_string(bad)
    assert repr(bad) in str(info.value)


def test_from_string_type_error():
    with pytest.raises(TypeError):
        CacheEngineKey.from_string(b"m@1@0@ff@half")


def test_layer_from_string_requires_layer():
    with pytest.raises(ValueError, match="no layer id") as info:
        LayerCacheEngineKey.from_string("m@1@0@ff@half")
    assert "'m@1@0@ff@half'" in str(info.value)


def test_dtype_names():
    names = ["half", "bfloat16", "float", "double", "uint8", "int8", "int16", "int32", "int64",
             "bool", "fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fnuz", "fp8_e5m2fnuz"]
    for name in names:
        assert dtype_to_name(name_to_dtype(name)) == name
    assert name_to_dtype("fp8_e4m3fnuz") is torch.float8_e4m3fnuz
    assert name_to_dtype("fp8_e5m2fnuz") is torch.float8_e5m2fnuz
    key = CacheEngineKey("m", 1, 0, 10, torch.float8_e5m2fnuz)
    assert key.to_string() == "m@1@0@a@fp8_e5m2fnuz" and CacheEngineKey.from_string("m@1@0@a@fp8_e5m2fnuz") == key
    assert name_to_dtype("half") is torch.float16 and name_to_dtype("float") is torch.float32
    assert dtype_to_name(torch.float8_e5m2) == "fp8_e5m2"
    with pytest.raises(ValueError, match="float16"):
        name_to_dtype("float16")
    with pytest.raises(ValueError):
        dtype_to_name(torch.complex64)


def test_a_chunk_hash_of_more_than_64_hex_digits_is_refused():
    # A 10000-digit "hash" parsed before, and repr() of that key raised ValueError (int → str
    # is capped at 4300 decimal digits), so logging such a key from a server failed.
    bad = "m@1@0@" + "f" * 10000 + "@half"
    with pytest.raises(ValueError) as err:
        CacheEngineKey.from_string(bad)
    assert str(err.value) == (f"invalid key string {bad!r}: chunk hash {'f' * 10000!r} is not "
                              "canonical lowercase hex")
    with pytest.raises(ValueError, match="is not canonical lowercase hex"):
        CacheEngineKey.from_string("m@1@0@-" + "1" * 65 + "@half")
    widest = "m@1@0@-" + "f" * 64 + "@half@3"
    key = CacheEngineKey.from_string(widest)
    assert key.chunk_hash == -(16 ** 64 - 1) and key.to_string() == widest
    assert repr(key).startswith("LayerCacheEngineKey(model_name='m'")
    lmcache_builtin = CacheEngineKey("m", 1, 0, -(2 ** 63), torch.half)
    assert CacheEngineKey.from_string(lmcache_builtin.to_string()) == lmcache_builtin
