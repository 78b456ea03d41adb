"""ints_to_numpy: a list/tuple of token ids as int64, through marshal's bytes when every item
is an int32 Python int, else np.fromiter (same values, same errors)."""

from __future__ import annotations

import numpy as np
import pytest

from lmcache.token_database.token_array import ints_to_numpy


@pytest.mark.parametrize("seq", [
    [], [0], [5, 300, 70000, 128255],
    [-2**31, 2**31 - 1, -1, 0, 23, 24, 255, 256, 65535, 65536],
    list(np.random.default_rng(0).integers(-2**31, 2**31, 5000).tolist()),
    tuple(range(1000)),
    [7] * 300,  # one int object repeated (marshal version 2 writes no references)
])
def test_int32_lists_round_trip(seq):
    got = ints_to_numpy(seq)
    assert got.dtype == np.int64 and got.tolist() == list(seq)


@pytest.mark.parametrize("seq", [
    [2**31, 1], [-2**31 - 1], [2**40, 3, 2**62],  # marshal writes these as longs
    [True, 2, False],  # bools: marshal's own codes
    [np.int64(5), 6], [np.int32(-3)],  # numpy ints: marshal refuses them
])
def test_other_ints_take_fromiter_with_its_values(seq):
    assert ints_to_numpy(seq).tolist() == [int(v) for v in seq]


def test_non_ints_raise_as_fromiter_does():
    with pytest.raises((TypeError, ValueError)):
        ints_to_numpy([1, "abc"])
    with pytest.raises(OverflowError):
        ints_to_numpy([2**64])
    with pytest.raises((TypeError, ValueError)):
        ints_to_numpy([[1, 2], [3]])
