"""The layerwise path (LMCache's ``use_layerwise: true``) end to end with real vLLM on the CPU.

vLLM's CPU attention calls the connector's wait_for_layer_load / save_kv_layer around every layer;
with ``lmcache.use_layerwise`` the chunks are stored per layer (LayerCacheEngineKey) and loaded
layer by layer in those hooks. A load that came too late would be dropped and recomputed, so the
noise control below (the loaded KV changes the answer) also proves that the loads were in time.
"""

from collections import defaultdict

from lmcache.keys import CacheEngineKey, LayerCacheEngineKey
from lmcache.storage.backends.disk_files import SUFFIX
from lmcache.storage.backends.disk_names import filename_to_key

CHUNK = 64
NUM_LAYERS = 2  # the tiny_model fixture's num_hidden_layers


def tokens_of(report, rnd):
    return [r["token_ids"] for r in report["rounds"][rnd]]


def test_layerwise_hits_give_identical_output_and_attend_over_loaded_kv(
        tiny_model, documents, run_vllm, tmp_path):
    disk = tmp_path / "disk"
    extra = {"lmcache.chunk_size": CHUNK, "lmcache.max_local_cpu_size": 0.25,
             "lmcache.use_layerwise": True, "lmcache.local_disk": str(disk),
             "lmcache.max_local_disk_size": 0.5}
    prompts = [documents[0] + "\nQuestion: what is this license about?",
               documents[0] + "\nQuestion: who may copy it?"]
    rounds = [[prompts[0]], [prompts[1]], [prompts[0]], [prompts[0]]]
    base = run_vllm({"model": tiny_model, "rounds": rounds[:3], "lmcache": False, "max_tokens": 16})
    # after round 2 every object of the CPU tier is overwritten with noise (negative control)
    lw = run_vllm({"model": tiny_model, "rounds": rounds, "lmcache": True, "extra_config": extra,
                   "max_tokens": 16, "corrupt_after_round": 2})
    first, second, third, fourth = (lw["rounds"][i][0] for i in range(4))
    assert first["num_cached_tokens"] == 0
    # the document is a shared prefix: its whole chunks hit on the second question
    assert second["num_cached_tokens"] >= (len(documents[0]) // 8 // CHUNK - 1) * CHUNK > 0
    assert second["num_cached_tokens"] % CHUNK == 0
    # the exact prompt again: all but the last token come from lmcache
    assert third["num_cached_tokens"] in (third["prompt_len"] - 1,
                                          third["prompt_len"] // CHUNK * CHUNK)
    assert [tokens_of(lw, i) for i in range(3)] == [tokens_of(base, i) for i in range(3)]

    # what was stored is per layer: every chunk under a LayerCacheEngineKey of each layer
    keys = [CacheEngineKey.from_string(filename_to_key(p.name, SUFFIX))
            for p in disk.rglob("*" + SUFFIX)]
    assert keys and all(isinstance(k, LayerCacheEngineKey) for k in keys)
    layers = defaultdict(set)
    for key in keys:
        layers[key.chunk_hash].add(key.layer_id)
    assert len(layers) >= third["prompt_len"] // CHUNK
    assert all(ids == set(range(NUM_LAYERS)) for ids in layers.values())

    # the noise was loaded layer by layer before each layer's attention: the answer changes
    assert lw["corrupted"] == len(keys)  # the CPU tier held the same per-layer objects
    assert fourth["num_cached_tokens"] > 0
    assert tokens_of(lw, 3) != tokens_of(lw, 0)
