"""The engine's CacheBlend data path (issue 9): a container-built engine with
token_database=segment and gpu_connector=vllm_buffer_layerwise stores a prompt of three documents
joined by the separator; a prompt with the documents in another order (one missing, new text
around them) gets per-layer buffers whose K is the stored K re-positioned to the new positions,
V as stored, zero elsewhere, and a mask of exactly the reused tokens. The positions survive the
disk and the remote (fs://) tiers and a restart; an object without them is a miss."""

from __future__ import annotations

import pytest
import torch

from lmcache.blend.blend_chunk import BlendChunkFormat
from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata

from reference_rope import rope_at

L, H, D, BS, BLOCKS, VOCAB, THETA = 2, 2, 16, 4, 24, 64, 10000.0
SEP = [1, 2]
META = LMCacheMetadata("org/m", 1, 0, torch.float32, (L, 2, 16, H, D))
LAYOUT = KVCacheLayout("cpu_packed", BS, H, D)
GEN = torch.Generator().manual_seed(0)
RAW_K = torch.randn(L, VOCAB, H, D, generator=GEN)   # pre-RoPE K of each token id
VAL = torch.randn(L, VOCAB, H, D, generator=GEN)
DOCS = [torch.randint(10, VOCAB, (n,), generator=GEN).tolist() for n in (9, 6, 11)]
SYSTEM, QUESTION = [3, 4, 5, 6], [7, 8, 9]


def join(*parts):
    out = []
    for i, part in enumerate(parts):
        out += (SEP if i else []) + part
    return out


def expected_kv(tokens, positions):
    """[L, 2, N, H, D]: K of each token computed at ``positions`` (what the model would make)."""
    ids = torch.tensor(tokens)
    k = torch.stack([rope_at(RAW_K[layer, ids], positions, THETA) for layer in range(L)])
    return torch.stack([k, VAL[:, ids]], dim=1)


def paged_with(tokens, slots):
    """Paged caches holding the KV of ``tokens`` prefilled at positions 0..N-1."""
    caches = [torch.zeros(BLOCKS, H, BS, 2 * D) for _ in range(L)]
    kv = expected_kv(tokens, torch.arange(len(tokens)))          # [L, 2, N, H, D]
    scatter_kv(caches, slots, LAYOUT, kv.transpose(0, 1).reshape(2, L, len(tokens), H * D))
    return caches


def make(tmp_path, *extra):
    cfg = compose_config(["chunk_size=16", "max_local_cpu_size=0.01", "token_database=segment",
                          f"token_database.separator_tokens=[{SEP[0]},{SEP[1]}]",
                          "gpu_connector=vllm_buffer_layerwise", "gpu_connector.device=cpu",
                          f"gpu_connector.rope_parameters={{rope_theta:{THETA}}}", *extra])
    container = build_worker_container(cfg, META, LAYOUT)
    return container, container.engine()


PROMPT_A = join(*DOCS)                                   # d1 S d2 S d3
PROMPT_B = join(SYSTEM, DOCS[2], DOCS[0], QUESTION)      # sys S d3 S d1 S q (d2 missing)
SLOTS_A = torch.randperm(BLOCKS * BS, generator=torch.Generator().manual_seed(1))[:len(PROMPT_A)]


def reused_mask():
    mask = torch.zeros(len(PROMPT_B), dtype=torch.bool)
    d3 = len(SYSTEM) + len(SEP)
    d1 = d3 + len(DOCS[2]) + len(SEP)
    mask[d3:d3 + len(DOCS[2])] = True
    mask[d1:d1 + len(DOCS[0])] = True
    return mask


def check_layers(engine, positions=None):
    """Run the blend retrieve of PROMPT_B and check every layer; returns the mask."""
    n = len(PROMPT_B)
    pos = torch.arange(n) if positions is None else positions
    want, reused = expected_kv(PROMPT_B, pos), reused_mask()
    gen = engine.retrieve_layers_for_blend(torch.tensor(PROMPT_B), new_positions=positions)
    mask = next(gen)
    assert torch.equal(mask, reused)
    layers = 0
    for layer, buf in enumerate(gen):
        layers += 1
        assert buf.shape == (2, n, H, D)
        assert (buf[0, reused] - want[layer, 0, reused]).abs().max() < 1e-5   # re-positioned K
        assert torch.equal(buf[1, reused], want[layer, 1, reused])          # V as stored
        assert not buf[:, ~reused].any()                                    # gaps zero
    assert layers == L
    return mask


def test_store_then_blend_retrieve_in_another_order(tmp_path):
    container, engine = make(tmp_path)
    try:
        caches = paged_with(PROMPT_A, SLOTS_A)
        stored = engine.store(torch.tensor(PROMPT_A), kvcaches=caches, slot_mapping=SLOTS_A)
        assert stored == sum(map(len, DOCS))
        assert engine.store(PROMPT_A, kvcaches=caches, slot_mapping=SLOTS_A) == 0  # cached
        assert torch.equal(engine.blend_lookup(PROMPT_B), reused_mask())
        assert int(engine.blend_lookup(PROMPT_B).sum()) == len(DOCS[0]) + len(DOCS[2])
        check_layers(engine)
        check_layers(engine, torch.arange(len(PROMPT_B)) + 37)   # any new positions
        assert all(o.get_ref_count() == 1 for o in _stored_objs(engine))  # all released
    finally:
        shutdown(container)


def _stored_objs(engine):
    return list(engine.storage_manager.backends[0].hot_cache.values())


def test_pure_reuse_retrieve_writes_the_reused_tokens_into_the_paged_cache(tmp_path):
    container, engine = make(tmp_path)
    try:
        engine.store(PROMPT_A, kvcaches=paged_with(PROMPT_A, SLOTS_A), slot_mapping=SLOTS_A)
        dst = [torch.full((BLOCKS, H, BS, 2 * D), 7.0) for _ in range(L)]
        slots_b = torch.arange(len(PROMPT_B)) + 5
        ret = engine.retrieve(PROMPT_B, kvcaches=dst, slot_mapping=slots_b)
        reused = reused_mask()
        assert torch.equal(ret, reused)
        got = gather_kv(dst, slots_b, LAYOUT).view(2, L, -1, H, D).transpose(0, 1)
        want = expected_kv(PROMPT_B, torch.arange(len(PROMPT_B)))
        assert (got[:, :, reused] - want[:, :, reused]).abs().max() < 1e-5
        assert bool((got[:, :, ~reused] == 7.0).all())            # the rest is untouched
    finally:
        shutdown(container)


def test_positions_survive_disk_and_remote_tiers_and_a_restart(tmp_path):
    extra = ["storage/backends=[local_cpu,local_disk,remote]", f"local_disk={tmp_path / 'disk'}",
             "max_local_disk_size=0.01", "remote_connector=fs",
             f"remote_url=fs://{tmp_path / 'remote'}"]
    container, engine = make(tmp_path, *extra)
    try:
        engine.store(PROMPT_A, kvcaches=paged_with(PROMPT_A, SLOTS_A), slot_mapping=SLOTS_A)
        for tier in engine.storage_manager.backends[1:]:
            assert tier.flush(timeout=30)
    finally:
        shutdown(container)
    container, engine = make(tmp_path, *extra)   # a new instance: the CPU tier is empty
    try:
        cpu, disk, _ = engine.storage_manager.backends
        assert not cpu.hot_cache
        check_layers(engine)                  # from the disk tier (written back to CPU)
        cpu.clear(), disk.clear()
        check_layers(engine)                  # from the remote tier alone
    finally:
        shutdown(container)


def test_an_object_without_positions_is_a_miss_never_wrong_kv(tmp_path):
    container, engine = make(tmp_path)
    try:
        engine.store(PROMPT_A, kvcaches=paged_with(PROMPT_A, SLOTS_A), slot_mapping=SLOTS_A)
        sm, fmt = engine.storage_manager, BlendChunkFormat(META)
        (_, _, key1), = [s for s in engine.token_database.process_tokens(DOCS[0])]
        blend_key = fmt.key(key1)
        assert blend_key.to_string().endswith("@lmcache.blend%pos1")
        plain = sm.allocate(torch.Size((2, L, len(DOCS[0]), H * D)), torch.float32,
                            MemoryFormat.KV_2LTD)             # what a non-blend instance stores
        plain.tensor.fill_(1.0)
        sm.batched_put([blend_key], [plain])
        gen = engine.retrieve_layers_for_blend(PROMPT_B)
        mask = next(gen)
        d3_only = reused_mask()
        d3_only[len(PROMPT_B) - len(QUESTION) - len(SEP) - len(DOCS[0]):] = False
        assert torch.equal(mask, d3_only)                     # d1 is a miss, d3 still a hit
        for buf in gen:
            assert not buf[:, ~d3_only].any()
        gen.close()
        assert sm.contains_prefix([blend_key]) == 0          # the bad object was removed
    finally:
        shutdown(container)


def test_errors(tmp_path):
    container, engine = make(tmp_path)
    try:
        with pytest.raises(ValueError, match="new_positions"):
            engine.retrieve_layers_for_blend(PROMPT_B, new_positions=torch.arange(3))
        with pytest.raises(ValueError, match="store_location"):
            engine.store(PROMPT_A, kvcaches=paged_with(PROMPT_A, SLOTS_A), slot_mapping=SLOTS_A,
                         store_location="LocalCPUBackend")
        with pytest.raises(ValueError, match="padding"):
            engine.store(PROMPT_A, kvcaches=paged_with(PROMPT_A, SLOTS_A),
                         slot_mapping=torch.full((len(PROMPT_A),), -1))
    finally:
        shutdown(container)
    cfg = compose_config(["chunk_size=16", "max_local_cpu_size=0.01"])
    plain = build_worker_container(cfg, META, LAYOUT)
    try:
        with pytest.raises(TypeError, match="vllm_buffer_layerwise"):
            plain.engine().blend_lookup(PROMPT_B)
    finally:
        shutdown(plain)


@pytest.mark.parametrize("serde", ["naive", "fp8", "cachegen"])
def test_remote_tier_with_any_serde_keeps_kv_and_positions_exact(tmp_path, serde):
    """Compressing serdes carry BINARY objects as plain bytes: blend chunks come back exact."""
    container, engine = make(tmp_path, "storage/backends=[local_cpu,remote]", f"serde={serde}",
                             "remote_connector=fs", f"remote_url=fs://{tmp_path / 'remote'}")
    try:
        engine.store(PROMPT_A, kvcaches=paged_with(PROMPT_A, SLOTS_A), slot_mapping=SLOTS_A)
        cpu, remote = engine.storage_manager.backends
        assert remote.flush(timeout=30)
        cpu.clear()
        check_layers(engine)
    finally:
        shutdown(container)


def test_a_segment_that_does_not_fit_costs_only_its_own_hit(tmp_path):
    """Segments are independent: one too large for the CPU tier is skipped (counted), the
    smaller ones after it are still stored and reused."""
    big = torch.randint(10, VOCAB, (60,), generator=torch.Generator().manual_seed(9)).tolist()
    prompt = join(big, DOCS[0], DOCS[1])                  # 60 tokens need ~31 KB
    slots = torch.arange(len(prompt)) + 3
    container, engine = make(tmp_path, "max_local_cpu_size=0.00002")   # ~21 KB
    try:
        stored = engine.store(prompt, kvcaches=paged_with(prompt, slots), slot_mapping=slots)
        assert stored == len(DOCS[0]) + len(DOCS[1])
        mask = engine.blend_lookup(join(DOCS[1], big, DOCS[0]))
        assert mask.tolist() == ([True] * len(DOCS[1]) + [False] * (len(SEP) + 60 + len(SEP))
                                 + [True] * len(DOCS[0]))
    finally:
        shutdown(container)
