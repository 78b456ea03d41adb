"""The channel contract's pure parts: descs, pairing, metadata parsing, copy merging."""

from __future__ import annotations

import pytest
import torch

from lmcache.transfer.base import (RegionInfo, check_pairs, pack_metadata, region_info,
                                   resolve_descs, unpack_metadata)
from lmcache.transfer.cuda_ipc import _merged


def test_descs_resolve_inside_their_regions():
    t = torch.zeros(1000, dtype=torch.uint8)
    regions = [region_info(t), RegionInfo(1 << 20, 64, 3, "VRAM")]
    assert regions[0] == (t.data_ptr(), 1000, 0, "DRAM")
    assert resolve_descs([(10, 5), (1, 0, 64)], regions, "local") == [
        (t.data_ptr() + 10, 5, 0, "DRAM"), ((1 << 20), 64, 3, "VRAM")]
    for bad, msg in [((995, 6), "outside region 0 of 1000"), ((0, 0), "outside"),
                     ((2, 0, 1), "names region 2"), ((1.5, 2), "must hold ints"), ((1,), "must be")]:
        with pytest.raises(ValueError, match=msg):
            resolve_descs([bad], regions, "local")
    with pytest.raises(ValueError, match="must be contiguous"):
        region_info(torch.zeros(4, 4)[:, 0])


def test_pairs_must_match_and_not_mix_memory():
    a = [(0, 8, 0, "DRAM")]
    with pytest.raises(ValueError, match="1 local descs but 2 remote"):
        check_pairs(a, a * 2)
    with pytest.raises(ValueError, match="no descs"):
        check_pairs([], [])
    with pytest.raises(ValueError, match="mix DRAM and VRAM"):
        check_pairs(a + [(0, 8, 0, "VRAM")], a * 2)


def test_metadata_round_trip_and_limits():
    md = pack_metadata("agent", "nixl", [RegionInfo(1, 2, 0, "DRAM")], nixl=b"blob")
    got = unpack_metadata(md, "nixl")
    assert (got["name"], got["regions"], got["nixl"]) == ("agent", [(1, 2, 0, "DRAM")], b"blob")
    with pytest.raises(ValueError, match="'nixl' channel, this is 'cuda_ipc'"):
        unpack_metadata(md, "cuda_ipc")
    with pytest.raises(ValueError, match="not a msgpack map|not version-1"):
        unpack_metadata(b"\xc1", "nixl")
    with pytest.raises(ValueError, match="must be bytes"):
        unpack_metadata("text", "nixl")


def test_adjacent_descs_merge_into_one_copy():
    assert _merged([(0, 0, 4), (0, 4, 4), (0, 10, 2), (1, 12, 2)],
                   [(0, 100, 4), (0, 104, 4), (0, 108, 2), (0, 110, 2)]) == [
        ((0, 0, 8), (0, 100, 8)), ((0, 10, 2), (0, 108, 2)), ((1, 12, 2), (0, 110, 2))]
