import pytest

from lmcache.storage.policy import (
    CachePolicy, FIFOCachePolicy, LFUCachePolicy, LRUCachePolicy, MRUCachePolicy,
)


def _run(policy: CachePolicy):
    for k in "abcd":
        policy.on_put(k)
    policy.on_hit("a")
    policy.on_hit("c")
    policy.on_hit("a")
    policy.on_put("b")  # re-put
    return list(policy.victims("abcd"))


@pytest.mark.parametrize("cls,expected", [
    (LRUCachePolicy, ["d", "c", "a", "b"]),
    (MRUCachePolicy, ["b", "a", "c", "d"]),
    (FIFOCachePolicy, ["a", "b", "c", "d"]),
    (LFUCachePolicy, ["b", "d", "c", "a"]),
])
def test_eviction_orders(cls, expected):
    assert _run(cls()) == expected


def test_lfu_ties_by_time_reached():
    p = LFUCachePolicy()
    for k in "xyz":
        p.on_put(k)
    p.on_hit("z")
    p.on_hit("x")  # x and z both have 2 uses; z got there first
    assert list(p.victims("xyz")) == ["y", "z", "x"]


@pytest.mark.parametrize("cls", [LRUCachePolicy, MRUCachePolicy, FIFOCachePolicy, LFUCachePolicy])
def test_remove_filter_and_unknown_candidates(cls):
    p = cls()
    for k in "abc":
        p.on_put(k)
    p.on_remove("b")
    p.on_remove("zzz")  # unknown: ignored
    p.on_hit("zzz")
    order = list(p.victims(["c", "q", "a"]))
    assert sorted(order[:2]) == ["a", "c"] and order[2] == "q"


def test_victims_is_snapshot():
    p = LRUCachePolicy()
    for k in "abc":
        p.on_put(k)
    seen = []
    for k in p.victims("abc"):
        p.on_remove(k)
        seen.append(k)
    assert seen == ["a", "b", "c"]
    assert p._order() == []  # all removed; unknown candidates still come back in given order
    assert list(p.victims("cab")) == ["c", "a", "b"]
