"""CacheBlend token selection (lmcache.blend.selection): pure torch, no model."""

import pytest
import torch

from lmcache.blend.selection import k_deviation, num_recomputed, select_recompute_tokens


@pytest.mark.parametrize("n,ratio,want", [(100, 0.15, 15), (100, 0.29, 29), (100, 0.0, 0),
                                          (100, 1.0, 100), (3, 0.5, 1), (7, 0.15, 1),
                                          (6, 0.15, 0), (0, 0.3, 0), (1000, 0.3, 300)])
def test_num_recomputed_is_floor_of_ratio_times_cached(n, ratio, want):
    assert num_recomputed(n, ratio) == want


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), "0.1", True, None])
def test_bad_ratio_is_refused_with_its_value(ratio):
    with pytest.raises(ValueError, match="ratio"):
        num_recomputed(10, ratio)


def test_k_deviation_is_squared_l2_per_token_in_float32():
    fresh = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]], dtype=torch.bfloat16)
    cached = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16)
    dev = k_deviation(fresh, cached)
    assert dev.dtype == torch.float32
    assert dev.tolist() == [4.0, 0.0, 10.0]
    with pytest.raises(ValueError, match="differ in shape"):
        k_deviation(fresh, cached[:2])


def test_selects_top_deviations_of_cached_tokens_plus_every_uncached_sorted():
    dev = torch.tensor([0.1, 9.0, 0.2, 5.0, 100.0, 0.3, 7.0, 0.0, 0.5, 6.0])
    uncached = torch.zeros(10, dtype=torch.bool)
    uncached[[4, 7]] = True    # 4 has the largest deviation but is uncached: not counted
    # 8 cached tokens, ratio 0.5 -> 4 of them: deviations 9 (1), 7 (6), 6 (9), 5 (3)
    got = select_recompute_tokens(dev, uncached, 0.5)
    assert got.dtype == torch.int64
    assert got.tolist() == [1, 3, 4, 6, 7, 9]
    assert select_recompute_tokens(dev, uncached, 0.0).tolist() == [4, 7]
    assert select_recompute_tokens(dev, uncached, 1.0).tolist() == list(range(10))


def test_ties_go_to_the_lowest_index():
    dev = torch.ones(8)
    got = select_recompute_tokens(dev, torch.zeros(8, dtype=torch.bool), 0.25)
    assert got.tolist() == [0, 1]


def test_bad_shapes_or_mask_dtype_are_refused():
    with pytest.raises(ValueError, match="bool uncached mask"):
        select_recompute_tokens(torch.ones(4), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="bool uncached mask"):
        select_recompute_tokens(torch.ones(4), torch.zeros(3, dtype=torch.bool), 0.5)
