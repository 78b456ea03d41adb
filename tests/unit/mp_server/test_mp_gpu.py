"""GPU: stock vLLM's LMCache MP adapter (``multi_process_adapter.py``, loaded from its file)
drives lmcache's MP server through CUDA IPC: 16k tokens of Llama-3-8B-shaped KV (32 layers,
8 KV heads, head size 128, bf16, block 16, all layers in one allocation as vLLM has them)
stored by one client, retrieved by a new client into other blocks, compared bit for bit.

The adapter file: ``$VLLM_MP_ADAPTER_FILE`` (the device job copies it from vLLM 0.32), else
the installed vLLM's. Skipped without CUDA or without the file.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch
import zmq

from mp_server_proc import free_port, start_server, stop_server

pytestmark = pytest.mark.gpu

L, H, D, N, TOKENS = 32, 8, 128, 16, 16384
MODEL = "meta-llama/Llama-3.1-8B"


def adapter_path() -> str | None:
    path = os.environ.get("VLLM_MP_ADAPTER_FILE")
    if path and os.path.exists(path):
        return path
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "distributed", "kv_transfer", "kv_connector",
                        "v1", "lmcache_integration", "multi_process_adapter.py")
    return path if os.path.exists(path) else None


def load_adapter():
    path = adapter_path()
    if path is None:
        pytest.skip("vLLM's multi_process_adapter.py not found (set VLLM_MP_ADAPTER_FILE)")
    spec = importlib.util.spec_from_file_location("vllm_mp_adapter", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def wait_finished(worker, request_id: str, store: bool, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stores, retrieves = worker.get_finished({request_id} if store else set())
        if request_id in (stores if store else retrieves):
            return
        time.sleep(0.002)
    raise AssertionError(f"{'store' if store else 'retrieve'} of {request_id} did not finish")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vllm_adapter_round_trip_16k_tokens_bit_exact():
    mod = load_adapter()
    port = free_port()
    server = start_server(port, ["max_local_cpu_size=4"])
    url = f"tcp://localhost:{port}"
    ctx = zmq.Context()
    try:
        num_blocks = 2 * TOKENS // N + 8
        gen = torch.Generator(device="cuda").manual_seed(0)
        kv_all = torch.randn(L, num_blocks, H, N, 2 * D, generator=gen, device="cuda",
                             dtype=torch.bfloat16)
        kv = {f"model.layers.{i}.self_attn.attn": kv_all[i] for i in range(L)}
        perm = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(1)) + 1
        src = perm[: TOKENS // N].tolist()
        dst = perm[TOKENS // N: 2 * (TOKENS // N)].tolist()
        kv_all[:, dst] = 0
        ids = torch.randint(0, 128000, (TOKENS,), generator=torch.Generator().manual_seed(2)).tolist()
        strategy = mod.ParallelStrategy(use_mla=False, kv_world_size=1, kv_worker_id=0,
                                        actual_world_size=1, actual_worker_id=0, tp_size=1,
                                        pp_size=1)

        writer = mod.LMCacheMPWorkerAdapter(url, ctx, MODEL, N, strategy)
        writer.register_kv_caches(kv)
        event = torch.cuda.Event(interprocess=True)
        event.record()
        writer.submit_store_request("req-a", mod.LoadStoreOp(block_ids=src, token_ids=ids,
                                                             start=0, end=TOKENS), event)
        wait_finished(writer, "req-a", store=True)
        writer.shutdown()

        scheduler = mod.LMCacheMPSchedulerAdapter(url, ctx, MODEL, N, strategy)
        scheduler.maybe_submit_lookup_request("req-b", token_ids=ids)
        deadline = time.monotonic() + 30
        while (hit := scheduler.check_lookup_result("req-b")) is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert hit == TOKENS

        reader = mod.LMCacheMPWorkerAdapter(url, ctx, MODEL, N, strategy)
        reader.register_kv_caches(kv)
        event = torch.cuda.Event(interprocess=True)
        event.record()
        reader.submit_retrieve_request("req-b", mod.LoadStoreOp(block_ids=dst, token_ids=ids,
                                                                start=0, end=TOKENS), event)
        wait_finished(reader, "req-b", store=False)
        torch.cuda.synchronize()
        assert torch.equal(kv_all[:, src].view(torch.int16), kv_all[:, dst].view(torch.int16))
        scheduler.end_session("req-b")
        reader.shutdown()
    finally:
        assert stop_server(server) == 0
