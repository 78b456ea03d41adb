"""VLLMBufferLayerwiseGPUConnector (CacheBlend's per-layer buffer, issue 9): re-positioned K
equals K computed at the new positions, gaps are zero, V is copied as stored, buffers alternate
(double buffering), the paged write and the segment gather are exact, errors name the value."""

from __future__ import annotations

import pytest
import torch

from lmcache.blend.rotary import FusedRotaryEmb
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.gpu_connector.vllm_buffer_layerwise import VLLMBufferLayerwiseGPUConnector
from lmcache.metadata import LMCacheMetadata

from reference_rope import rope_at

L, H, D, BS, BLOCKS = 3, 2, 16, 4, 12
THETA = 10000.0
META = LMCacheMetadata("org/m", 1, 0, torch.float32, (L, 2, 16, H, D))
LAYOUT = KVCacheLayout("cpu_packed", BS, H, D)


def connector(**kw) -> VLLMBufferLayerwiseGPUConnector:
    kw.setdefault("rope_parameters", {"rope_theta": THETA})
    kw.setdefault("device", "cpu")
    return VLLMBufferLayerwiseGPUConnector(META, LAYOUT, **kw)


def segment(raw_k, v, old_start):
    """Stored KV [L, 2, T, H*D] of a segment computed at old_start.. (K roped there)."""
    t = raw_k.shape[1]
    pos = torch.arange(old_start, old_start + t)
    k = torch.stack([rope_at(raw_k[layer], pos, THETA) for layer in range(L)])
    return torch.stack([k.view(L, t, H * D), v.reshape(L, t, H * D)], dim=1).contiguous()


def test_repositioned_k_equals_k_at_new_positions_gaps_zero_v_unchanged():
    gen = torch.Generator().manual_seed(0)
    n = 40
    # segment a: 7 tokens computed at 3..9, now at tokens 20..26; b: 5 tokens at 500.., now 2..6
    raw = {name: torch.randn(L, t, H, D, generator=gen) for name, t in (("a", 7), ("b", 5))}
    vals = {name: torch.randn(L, r.shape[1], H, D, generator=gen) for name, r in raw.items()}
    src_a, src_b = segment(raw["a"], vals["a"], 3), segment(raw["b"], vals["b"], 500)
    new_positions = torch.arange(n) + 11   # e.g. a prompt continuing after 11 tokens
    layers = connector().load_layers([src_b, src_a], [2, 20], [7, 27], [500, 3], new_positions)
    covered = torch.zeros(n, dtype=torch.bool)
    covered[2:7] = covered[20:27] = True
    seen = 0
    for layer, buf in enumerate(layers):  # a buffer is valid until the next next()
        seen += 1
        assert buf.shape == (2, n, H, D) and buf.dtype == torch.float32
        want_a = rope_at(raw["a"][layer], new_positions[20:27], THETA)
        want_b = rope_at(raw["b"][layer], new_positions[2:7], THETA)
        assert (buf[0, 20:27] - want_a).abs().max() < 1e-4   # float32 angles (as vLLM's)
        assert (buf[0, 2:7] - want_b).abs().max() < 1e-4
        assert torch.equal(buf[1, 20:27], vals["a"][layer])
        assert torch.equal(buf[1, 2:7], vals["b"][layer])
        assert not buf[:, ~covered].any()      # separators / uncached tokens: exactly zero
    assert seen == L


def test_double_buffering_alternates_two_buffers_and_keeps_sources():
    gen = torch.Generator().manual_seed(1)
    src = segment(torch.randn(L, 4, H, D, generator=gen), torch.randn(L, 4, H, D, generator=gen), 0)
    before = src.clone()
    layers = connector().load_layers([src], [1], [5], [0], torch.arange(8))
    ptrs = []
    for buf in layers:
        ptrs.append(buf.data_ptr())
        assert torch.equal(buf[1, 1:5], src[len(ptrs) - 1, 1].view(4, H, D))
    assert ptrs[0] == ptrs[2] != ptrs[1]     # layer i+2 reuses layer i's buffer
    assert torch.equal(src, before)          # the stored KV is never rotated in place


def test_bfloat16_and_llama3_rope():
    meta = LMCacheMetadata("org/m", 1, 0, torch.bfloat16, (L, 2, 16, H, D))
    params = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    conn = VLLMBufferLayerwiseGPUConnector(meta, LAYOUT, rope_parameters=params, device="cpu")
    fused = FusedRotaryEmb.from_rope_parameters(D, params)
    gen = torch.Generator().manual_seed(2)
    raw = torch.randn(6, H * D, generator=gen)
    k_old = fused(torch.zeros(6, dtype=torch.long), torch.arange(100, 106), raw.clone())
    k_new = fused(torch.zeros(6, dtype=torch.long), torch.arange(9, 15), raw.clone())
    kv = torch.stack([k_old, torch.ones(6, H * D)])[None].expand(L, 2, 6, H * D)
    src = kv.to(torch.bfloat16).contiguous()
    buf = next(conn.load_layers([src], [9], [15], [100], torch.arange(20)))
    assert buf.dtype == torch.bfloat16
    assert (buf[0, 9:15].reshape(6, -1).float() - k_new).abs().max() < 0.05
    assert not buf[:, :9].any() and not buf[:, 15:].any()


def paged_cache(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(BLOCKS, H, BS, 2 * D, generator=gen) for _ in range(L)]


def test_write_layer_equals_the_buffer_for_a_random_block_table():
    n = 18
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randperm(BLOCKS, generator=gen)[:5]           # a random block table
    slots = (blocks[:, None] * BS + torch.arange(BS)).reshape(-1)[:n]
    kv = torch.randn(2, n, H, D, generator=gen)
    caches = paged_cache(4)
    conn = connector()
    conn.write_layer(kv, caches[1], slot_mapping=slots)
    got = gather_kv([caches[1]], slots, LAYOUT)[:, 0]            # [2, n, H*D]
    assert torch.equal(got, kv.reshape(2, n, H * D))
    # token_mask: only those tokens are written, the others keep their paged KV
    caches2, keep = paged_cache(4), torch.arange(n) % 3 == 0
    before = gather_kv([caches2[0]], slots, LAYOUT)[:, 0]
    conn.write_layer(kv.reshape(2, n, H * D), caches2[0], keep, slot_mapping=slots)
    after = gather_kv([caches2[0]], slots, LAYOUT)[:, 0]
    assert torch.equal(after[:, keep], kv.reshape(2, n, H * D)[:, keep])
    assert torch.equal(after[:, ~keep], before[:, ~keep])


def test_gather_segment_reads_every_layer_of_a_token_range():
    caches = paged_cache(5)
    slots = torch.randperm(BLOCKS * BS, generator=torch.Generator().manual_seed(6))[:20]
    out = torch.empty(L, 2, 6, H * D)
    connector().gather_segment(out, 9, 15, kvcaches=caches, slot_mapping=slots)
    want = gather_kv(caches, slots[9:15], LAYOUT)               # [2, L, 6, H*D]
    assert torch.equal(out, want.permute(1, 0, 2, 3))
    out2 = torch.empty(L, 2, 6, H * D)                           # offset: slots start at token 4
    connector().gather_segment(out2, 9, 15, kvcaches=caches, slot_mapping=slots[4:], offset=4)
    assert torch.equal(out2, out)


def test_errors_name_the_value():
    src = torch.zeros(L, 2, 4, H * D)
    with pytest.raises(ValueError, match="no RoPE"):
        VLLMBufferLayerwiseGPUConnector(META, LAYOUT, device="cpu").load_layers(
            [src], [0], [4], [0], torch.arange(4))
    with pytest.raises(ValueError, match=r"source for tokens \[0, 3\)"):
        connector().load_layers([src], [0], [3], [0], torch.arange(4))
    with pytest.raises(ValueError, match="ascending"):
        connector().load_layers([src, src], [4, 0], [8, 4], [0, 0], torch.arange(8))
    with pytest.raises(ValueError, match="new_positions"):
        connector().load_layers([src], [0], [4], [0], torch.arange(4.0))
    with pytest.raises(ValueError, match="padding"):
        connector().gather_segment(torch.empty(L, 2, 2, H * D), 0, 2, kvcaches=paged_cache(0),
                                   slot_mapping=torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="kv must be"):
        connector().write_layer(torch.zeros(2, 4, H, D + 1), paged_cache(0)[0],
                                slot_mapping=torch.arange(4))
    with pytest.raises(ValueError, match="MLA"):
        VLLMBufferLayerwiseGPUConnector(
            LMCacheMetadata("m", 1, 0, torch.float32, (L, 1, 16, 1, D), use_mla=True),
            KVCacheLayout("mla", BS, 1, D))
    with pytest.raises(ValueError, match="cannot be re-positioned"):
        connector(rope_parameters={"rope_type": "yarn", "factor": 2.0})


def test_rotary_given_per_call_overrides_the_connectors_own():
    """The Blender passes its model's RoPE per retrieve; a connector built without one
    (rope_parameters null) loads with it and is not modified."""
    gen = torch.Generator().manual_seed(4)
    raw, v = torch.randn(L, 6, H, D, generator=gen), torch.randn(L, 6, H, D, generator=gen)
    src = segment(raw, v, 100)
    bare = VLLMBufferLayerwiseGPUConnector(META, LAYOUT, device="cpu")
    got = [b.clone() for b in bare.load_layers([src], [1], [7], [100], torch.arange(8),
                                               rotary=FusedRotaryEmb(D, base=THETA))]
    assert bare.rotary is None
    want = [b.clone() for b in connector().load_layers([src], [1], [7], [100], torch.arange(8))]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    torch.testing.assert_close(got[2][0, 1:7], rope_at(raw[2], torch.arange(1, 7), THETA),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rotary must be a FusedRotaryEmb of head_size 16"):
        bare.load_layers([src], [1], [7], [100], torch.arange(8), rotary=FusedRotaryEmb(8))


def test_write_layer_refuses_slots_outside_the_cache():
    with pytest.raises(ValueError, match="slots"):
        connector().write_layer(torch.zeros(2, 2, H, D), paged_cache(0)[0],
                                slot_mapping=torch.tensor([0, BLOCKS * BS]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_double_buffering_matches_the_cpu_path_under_slow_compute():
    """Pinned sources, buffers on the GPU: every layer equals the CPU path's although the
    caller's compute stream lags (a large matmul before each read): layer i+2's load must wait
    for the compute that reads layer i's buffer."""
    gen = torch.Generator().manual_seed(7)
    n, layers = 64, []
    srcs = [segment(torch.randn(L, t, H, D, generator=gen), torch.randn(L, t, H, D, generator=gen),
                    o).pin_memory() for t, o in ((20, 3), (30, 900))]
    args = ([4, 30], [24, 60], [3, 900], torch.arange(n) + 5)
    want = [b.clone() for b in connector().load_layers(srcs, *args)]
    big = torch.randn(4096, 4096, device="cuda")
    for buf in connector(device="cuda").load_layers(srcs, *args):
        for _ in range(3):
            big = (big @ big).tanh()          # keeps the compute stream busy
        layers.append((buf * 1 + big[0, 0] * 0).cpu())
    for layer, got in enumerate(layers):
        assert (got - want[layer]).abs().max() < 1e-5, layer
