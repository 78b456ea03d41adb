"""Everything that determines a KV reaches its chunk key (issue 7.13): cache_salt, LoRA adapter and
multimodal items, through the connector's own pieces (request_keys → token database → engine);
prompt embeddings and pipeline parallelism are refused at start."""

from types import SimpleNamespace

import pytest
import torch

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.integration.vllm.request_keys import (
    check_supported,
    hash_tokens,
    mm_token_values,
    request_configs,
)
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

C, L, H, D, N, BLOCKS = 4, 2, 2, 8, 4, 16
DTYPE = torch.bfloat16
TOKENS = list(range(100, 116))  # 4 chunks


def req(tokens=TOKENS, salt=None, lora=None, mm=(), params=None):
    features = [SimpleNamespace(identifier=i, mm_position=SimpleNamespace(offset=o, length=n))
                for i, o, n in mm]
    return SimpleNamespace(all_token_ids=list(tokens), cache_salt=salt, mm_features=features,
                           lora_request=None if lora is None else SimpleNamespace(lora_name=lora[0], lora_path=lora[1]),
                           kv_transfer_params=params, sampling_params=None)


@pytest.fixture
def engine():
    meta = LMCacheMetadata("org/model", 1, 0, DTYPE, (L, 2, C, H, D))
    allocator = CPUMemoryAllocator(64 * 2 * L * C * H * D * 2)
    eng = LMCacheEngine(meta, ChunkedTokenDatabase(meta, C),
                        VLLMPagedMemGPUConnectorV2(meta, KVCacheLayout("cpu_packed", N, H, D)),
                        StorageManager([LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=1.0)]))
    yield eng
    eng.close()
    assert allocator.num_active_allocations == 0


def store(engine, r):
    cache = [torch.randn(BLOCKS, H, N, 2 * D).to(DTYPE) for _ in range(L)]
    slots = torch.arange(N, N + len(r.all_token_ids))
    return engine.store(torch.tensor(hash_tokens(r)), kvcaches=cache, slot_mapping=slots,
                        request_configs=request_configs(r))


def lookup(engine, r):
    return engine.lookup(torch.tensor(hash_tokens(r)), request_configs=request_configs(r))


def test_same_tokens_different_cache_salt_never_hit_each_other(engine):
    alice, bob, plain = req(salt="alice"), req(salt="bob"), req()
    assert store(engine, alice) == 16
    assert lookup(engine, alice) == 16
    assert lookup(engine, bob) == 0 and lookup(engine, plain) == 0
    assert store(engine, plain) == 16
    assert lookup(engine, bob) == 0 and lookup(engine, plain) == 16 and lookup(engine, alice) == 16


def test_lora_adapter_name_and_path_are_in_the_key(engine):
    a = req(lora=("sql", "/adapters/sql-v1"))
    assert store(engine, a) == 16
    assert lookup(engine, a) == 16
    assert lookup(engine, req(lora=("sql", "/adapters/sql-v2"))) == 0
    assert lookup(engine, req(lora=("chat", "/adapters/sql-v1"))) == 0
    assert lookup(engine, req()) == 0


def test_multimodal_items_are_in_the_key(engine):
    cat = req(mm=[("img-cat", 4, 6)])
    assert store(engine, cat) == 16
    assert lookup(engine, cat) == 16
    assert lookup(engine, req(mm=[("img-dog", 4, 6)])) == 4  # chunk 0 holds no image token
    assert lookup(engine, req()) == 4
    assert lookup(engine, req(mm=[("img-cat", 5, 5)])) == 4  # same image elsewhere: other KV


def test_user_params_cannot_set_the_salt():
    r = req(params={"vllm.cache_salt": "bob", "lmcache.tag.user": "eve", "other": 1})
    assert request_configs(r) == {"lmcache.tag.user": "eve"}
    assert request_configs(req(salt="s", lora=("a", None))) == {
        "vllm.cache_salt": "s", "vllm.lora_name": "a", "vllm.lora_path": ""}
    assert request_configs(req()) is None


def test_mm_token_values_are_lmcaches():
    """Reference values from LMCache 0.5.6's mm_hash_to_token_values (run from its source)."""
    assert mm_token_values("img-abc", 10) == (885764189, 1896175433, 323138569, 1371554958,
                                              1563226321, 246404551, 520623522, 1040020952,
                                              672055521, 900468035)
    assert mm_token_values("chatcmpl-1-image-0", 3) == (1248258758, 1399347753, 1033985582)
    assert mm_token_values("img-abc", 4) == mm_token_values("img-abc", 10)[:4]
    toks = hash_tokens(req(mm=[("img-abc", 14, 10)]))
    assert toks[:14] == TOKENS[:14] and toks[14:] == [885764189, 1896175433]
    with pytest.raises(ValueError, match="-1"):
        mm_token_values("x", -1)


def test_prompt_embeds_and_pipeline_parallel_refused_at_start():
    def cfg(embeds=False, pp=1):
        return SimpleNamespace(model_config=SimpleNamespace(enable_prompt_embeds=embeds),
                               parallel_config=SimpleNamespace(pipeline_parallel_size=pp))

    check_supported(cfg())
    with pytest.raises(ValueError, match="enable_prompt_embeds"):
        check_supported(cfg(embeds=True))
    with pytest.raises(ValueError, match="pipeline_parallel_size=2"):
        check_supported(cfg(pp=2))
