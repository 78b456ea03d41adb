"""vLLM 0.32's own ``multi_process_adapter.py`` (the installed vLLM's file, loaded by path: it
imports only torch, zmq and lmcache) drives lmcache's MP server on CPU. The adapter asks
``event.ipc_handle()`` of a CUDA event; on CPU an event stand-in answers ``b""`` (nothing to
wait for); the KV cache is a real shared-memory tensor. The GPU version of this test
(test_mp_gpu.py) runs the same file with CUDA IPC on the device."""

from __future__ import annotations

import pytest
import torch
import zmq

from mp_server_proc import SHARED_CHUNK, finished, wait_until
from test_mp_gpu import adapter_path, load_adapter

CHUNK, N, L, H, D, B = SHARED_CHUNK, 8, 3, 2, 4, 40


class NoEvent:
    """CPU stand-in of ``torch.cuda.Event(interprocess=True)``: no device work to wait for."""

    def ipc_handle(self) -> bytes:
        return b""


@pytest.mark.skipif(adapter_path() is None, reason="vLLM's multi_process_adapter.py not installed")
def test_stock_vllm_adapter_round_trip_on_cpu(mp_url):
    mod = load_adapter()
    url, ctx = mp_url, zmq.Context()
    if True:
        strategy = mod.ParallelStrategy(use_mla=False, kv_world_size=1, kv_worker_id=0,
                                        actual_world_size=1, actual_worker_id=0, tp_size=1, pp_size=1)
        whole = torch.randn(L, B, H, N, 2 * D, generator=torch.Generator().manual_seed(0))
        kv = {f"l{i}": whole[i] for i in range(L)}
        tokens = list(range(64))
        src, dst = list(range(1, 9)), list(range(20, 28))
        writer = mod.LMCacheMPWorkerAdapter(url, ctx, "stock", N, strategy)
        writer.register_kv_caches(kv)
        writer.submit_store_request("a", mod.LoadStoreOp(block_ids=src, token_ids=tokens, start=0,
                                                         end=64), NoEvent())
        finished(writer, "a", store=True)
        writer.shutdown()

        sched = mod.LMCacheMPSchedulerAdapter(url, ctx, "stock", N, strategy)
        assert sched.num_blocks_per_chunk() == CHUNK // N
        sched.maybe_submit_lookup_request("b", token_ids=tokens + [1, 2])
        assert wait_until(lambda: sched.check_lookup_result("b")) == 64
        reader = mod.LMCacheMPWorkerAdapter(url, ctx, "stock", N, strategy)
        reader.register_kv_caches(kv)
        assert not torch.equal(whole[:, src], whole[:, dst])
        reader.submit_retrieve_request("b", mod.LoadStoreOp(block_ids=dst, token_ids=tokens,
                                                            start=0, end=64), NoEvent())
        finished(reader, "b", store=False)
        assert torch.equal(whole[:, src], whole[:, dst])
        sched.end_session("b")
        reader.shutdown()
        sched.mq_client.close()
