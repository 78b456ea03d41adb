"""CudaIpcChannel's one-pass desc planning (CPU: no CUDA needed)."""

from __future__ import annotations

import pytest

from lmcache.transfer.cuda_ipc import _merged, plan_copies

MiB = 1 << 20


def test_adjacent_descs_merge_and_the_rest_stay_apart():
    chunk = 32 * MiB
    descs = [(i * chunk, chunk) for i in range(64)]
    assert plan_copies(descs, descs, [64 * chunk], [64 * chunk]) == [
        ((0, 0, 64 * chunk), (0, 0, 64 * chunk))]
    rev = list(reversed(descs))
    assert plan_copies(descs, rev, [64 * chunk], [64 * chunk]) == [
        ((0, i * chunk, chunk), (0, (63 - i) * chunk, chunk)) for i in range(64)]
    local = [(0, 0, 4), (0, 4, 4), (0, 10, 2), (1, 12, 2)]
    remote = [(0, 100, 4), (0, 104, 4), (0, 108, 2), (0, 110, 2)]
    assert plan_copies(local, remote, [100, 100], [200]) == _merged(local, remote)
    assert plan_copies([[0, 4], [4, 4]], [(1, 0, 4), (1, 4, 4)], [8], [1, 8]) == [
        ((0, 0, 8), (1, 0, 8))]


@pytest.mark.parametrize(("local", "remote", "msg"), [
    ([(995, 6)], [(0, 6)], "local desc 0 = .* outside region 0 of 1000"),
    ([(0, 0)], [(0, 0)], "outside"),
    ([(2, 0, 1)], [(0, 1)], "local desc 0 names region 2; there are 1 regions"),
    ([(-1, 0, 1)], [(0, 1)], "names region -1"),
    ([(0, 4)], [(-4, 4)], "remote desc 0 .* outside"),
    ([(1.5, 2)], [(0, 2)], "must hold ints"),
    ([(True, 4)], [(0, 4)], "must hold ints"),
    ([(1,)], [(0, 1)], r"must be \(offset, length\)"),
    (["ab"], [(0, 2)], r"must be \(offset, length\)"),
    ([(0, 4)], [(0, 8)], "local length 4 != remote length 8"),
    ([(0, 4), (4, 4)], [(0, 4)], "2 local descs but 1 remote descs"),
    ([], [], "no descs to transfer"),
    ([(0, 4)], [(60, 8)], "remote desc 0 .* outside region 0 of 64"),
])
def test_bad_descs_are_named(local, remote, msg):
    with pytest.raises(ValueError, match=msg):
        plan_copies(local, remote, [1000], [64])

