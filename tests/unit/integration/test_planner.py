"""Scheduler arithmetic of the vLLM integration (DESIGN §4.7), without vLLM objects."""

import pytest
import torch

from lmcache.integration.vllm.planner import ConnectorPlanner

C, B = 16, 4  # chunk_size, block_size


def blocks_for(n):
    return list(range(10, 10 + -(-n // B)))


def test_need_is_hit_minus_vllm_computed():
    p = ConnectorPlanner(C, B)
    assert p.on_lookup("r", num_tokens=100, num_computed_tokens=8, hit=48) == 40


def test_whole_prompt_hit_leaves_last_token_for_logits():
    p = ConnectorPlanner(C, B)
    assert p.on_lookup("r", num_tokens=64, num_computed_tokens=0, hit=64) == 63


def test_need_never_negative():
    p = ConnectorPlanner(C, B)
    assert p.on_lookup("r", num_tokens=100, num_computed_tokens=48, hit=32) == 0


def test_load_range_and_fetch_whole_chunks():
    p = ConnectorPlanner(C, B)
    tokens = list(range(64))
    assert p.on_lookup("r", 64, num_computed_tokens=20, hit=64) == 43
    p.on_alloc("r", 43)
    meta, unpin = p.plan_new("r", tokens, 64, blocks_for(64), num_computed_tokens=63, num_scheduled_tokens=1)
    assert unpin
    assert (meta.load_from, meta.load_end) == (20, 63)
    assert meta.load_skip_tokens == 16  # floor(20 / 16) * 16
    assert meta.load_fetch_end == 64  # the stored chunk that holds token 62 ends at 64
    assert meta.save_spec is None  # lmcache already holds the whole prompt
    expected = torch.tensor([10 + i // B for i in range(64)]) * B + torch.arange(64) % B
    assert torch.equal(meta.slot_mapping, expected)
    assert torch.equal(meta.token_ids, torch.arange(64))


def test_no_alloc_means_no_load_but_pins_released():
    p = ConnectorPlanner(C, B)
    p.on_lookup("r", 40, 0, hit=32)
    meta, unpin = p.plan_new("r", list(range(40)), 40, blocks_for(40), 0, 40)
    assert unpin and meta.load_spec is None
    # lmcache holds 32 tokens: the final prefill saves only the rest, with the mask's False prefix
    assert meta.save_spec.skip_leading_tokens == 32 and meta.save_end == 40


def test_chunked_prefill_saves_whole_chunks_until_final_step():
    p = ConnectorPlanner(C, B)
    tokens = list(range(50))
    meta, _ = p.plan_new("r", tokens, 50, blocks_for(20), num_computed_tokens=0, num_scheduled_tokens=20)
    assert meta.save_end == 16 and meta.save_spec.skip_leading_tokens == 0
    meta = p.plan_cached("r", tokens, blocks_for(50)[len(blocks_for(20)):], False, 20, 20)
    assert meta.save_end == 32 and meta.save_spec.skip_leading_tokens == 16
    meta = p.plan_cached("r", tokens, blocks_for(50)[len(blocks_for(40)):], False, 40, 10)
    assert meta.save_end == 50 and meta.save_spec.skip_leading_tokens == 32
    assert p.plan_cached("r", tokens + [7], None, False, 50, 1) is None  # decode: not saved


def test_save_decode_cache_saves_generated_chunks():
    p = ConnectorPlanner(C, B, save_decode_cache=True)
    tokens = list(range(40))
    meta, _ = p.plan_new("r", tokens[:20], 20, blocks_for(40), 0, 20)
    assert meta.save_end == 20
    assert p.plan_cached("r", tokens[:31], None, False, 30, 1) is None  # 31 < next chunk end 32
    meta = p.plan_cached("r", tokens[:33], None, False, 32, 1)
    assert meta.save_end == 32 and meta.save_spec.skip_leading_tokens == 16


def test_producer_never_loads_and_saves_everything():
    p = ConnectorPlanner(C, B, kv_role="kv_producer")
    p.on_lookup("r", 40, 0, hit=32)
    p.on_alloc("r", 32)
    meta, _ = p.plan_new("r", list(range(40)), 40, blocks_for(40), 32, 8)
    assert meta.load_spec is None
    assert meta.save_spec.skip_leading_tokens == 0 and meta.save_end == 40


def test_consumer_never_saves():
    p = ConnectorPlanner(C, B, kv_role="kv_consumer")
    assert p.plan_new("r", list(range(40)), 40, blocks_for(40), 0, 40) == (None, False)


def test_preemption_replaces_blocks():
    p = ConnectorPlanner(C, B, save_decode_cache=True)
    p.plan_new("r", list(range(8)), 8, [1, 2], 0, 8)
    meta = p.plan_cached("r", list(range(16)), [7, 8, 9, 5], True, 15, 1)
    assert meta.save_end == 16
    assert meta.slot_mapping[:4].tolist() == [28, 29, 30, 31]


def test_slots_beyond_allocated_blocks_are_padding():
    p = ConnectorPlanner(C, B)
    p.on_lookup("r", 100, 0, hit=32)
    p.on_alloc("r", 25)
    meta, _ = p.plan_new("r", list(range(100)), 100, blocks_for(26), 25, 1)  # 7 blocks = 28 slots
    assert meta.load_fetch_end == 32 and meta.slot_mapping.numel() == 32
    assert meta.slot_mapping[27].item() == 16 * B + 3
    assert meta.slot_mapping[28:].tolist() == [-1] * 4


@pytest.mark.parametrize("kwargs, name", [({"chunk_size": 0}, "chunk_size"), ({"kv_role": "both"}, "both")])
def test_bad_arguments_are_named(kwargs, name):
    args = {"chunk_size": C, "block_size": B, **kwargs}
    with pytest.raises(ValueError, match=name):
        ConnectorPlanner(**args)
