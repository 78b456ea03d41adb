"""lmcache's MP server in its own process, driven by lmcache's adapter (the module vLLM's
``LMCacheMPConnector`` imports), on CPU: KV caches shared through real shared memory (the CPU
stand-in of CUDA IPC), real ZMQ, real server process. Bytes are compared exactly."""

from __future__ import annotations

import os

import pytest
import torch
import zmq

from lmcache.integration.vllm.vllm_multi_process_adapter import (
    LMCacheMPSchedulerAdapter, LMCacheMPWorkerAdapter, LoadStoreOp, ParallelStrategy)
from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey
from lmcache.v1.multiprocess.mq import MessageQueueClient
from lmcache.v1.multiprocess.offload_client import OffloadClient
from lmcache.v1.multiprocess.protocol import RequestType
from mp_server_proc import SHARED_CHUNK, finished, lookup

CHUNK, N, L, H, D, B = SHARED_CHUNK, 4, 2, 2, 8, 64   # chunk 16 tokens = 4 blocks of 4


@pytest.fixture
def url(mp_url):
    return mp_url


def kv_caches(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    whole = torch.randn(L, B, H, N, 2 * D, generator=gen)  # one allocation, per-layer views
    return {f"layers.{i}.attn": whole[i] for i in range(L)}


def strategy(rank: int = 0, world: int = 1) -> ParallelStrategy:
    return ParallelStrategy(False, world, rank, world, rank, world, 1)


def worker(url, model, rank=0, world=1):
    return LMCacheMPWorkerAdapter(url, zmq.Context.instance(), model, N, strategy(rank, world),
                                  mq_timeout=10, heartbeat_interval=0.5)


def scheduler(url, model, world=1):
    return LMCacheMPSchedulerAdapter(url, zmq.Context.instance(), model, N, strategy(0, world),
                                     mq_timeout=10, heartbeat_interval=0.5)


def store(w, rid, tokens, blocks, start=0, end=None, salt=""):
    end = len(tokens) if end is None else end
    w.batched_submit_store_requests([rid], [LoadStoreOp(blocks, list(tokens), start=start, end=end)],
                                    None, cache_salts=[salt])
    finished(w, rid, store=True)


def retrieve(w, rid, tokens, blocks, end=None, skip=0):
    end = len(tokens) if end is None else end
    w.batched_submit_retrieve_requests(
        [rid], [LoadStoreOp(blocks, list(tokens), start=0, end=end, skip_first_n_tokens=skip)], None)
    finished(w, rid, store=False)
    return w.get_block_ids_with_load_errors()


def same(kv, src, dst) -> bool:
    return all(torch.equal(t[src], t[dst]) for t in kv.values())


def test_chunk_size_store_lookup_retrieve_bit_exact(url):
    w, s = worker(url, "m-basic"), scheduler(url, "m-basic")
    try:
        assert w.link.connected and w.num_blocks_per_chunk() == CHUNK // N
        kv = w_kv = kv_caches(1)
        w.register_kv_caches(w_kv)
        tokens = list(range(1000, 1048))                      # 3 chunks
        src, dst = list(range(1, 13)), list(range(20, 32))
        store(w, "a", tokens, src)
        assert lookup(s, "b", tokens + [7, 8, 9]) == 48        # the partial tail is not counted
        assert lookup(s, "c", tokens[:40]) == 32
        assert lookup(s, "d", [5] + tokens[1:]) == 0            # prefix hash: first token differs
        assert not same(kv, src, dst)
        assert retrieve(w, "b", tokens, dst) == set()
        assert same(kv, src, dst)
        for rid in "bcd":
            s.end_session(rid)
    finally:
        w.shutdown()
        s.close()


def test_retrieve_skips_first_tokens_and_reports_load_errors(url):
    w = worker(url, "m-skip")
    try:
        kv = kv_caches(2)
        w.register_kv_caches(kv)
        tokens = list(range(50, 82))                          # 2 chunks
        store(w, "a", tokens, list(range(1, 9)))
        dst = list(range(30, 38))
        keep = {k: t[30:32].clone() for k, t in kv.items()}
        assert retrieve(w, "b", tokens, dst, skip=2 * N) == set()
        assert all(torch.equal(kv[k][30:32], keep[k]) for k in kv)   # APC-shared blocks untouched
        assert same(kv, list(range(3, 9)), list(range(32, 38)))
        # a prefix the server does not have: the blocks after the skip are reported for recompute
        missing = retrieve(w, "c", [9] * 32, list(range(40, 48)), skip=N)
        assert missing == set(range(41, 48))
    finally:
        w.shutdown()


def test_cache_salt_separates_caches(url):
    w, s = worker(url, "m-salt"), scheduler(url, "m-salt")
    try:
        w.register_kv_caches(kv_caches(3))
        tokens = list(range(16))
        store(w, "a", tokens, [1, 2, 3, 4], salt="tenant-1")
        assert lookup(s, "b", tokens, cache_salt="tenant-1") == 16
        assert lookup(s, "c", tokens, cache_salt="tenant-2") == 0
        assert lookup(s, "d", tokens) == 0
    finally:
        w.shutdown()
        s.close()


def test_tensor_parallel_lookup_needs_every_rank(url):
    kv0, kv1 = kv_caches(4), kv_caches(5)
    w0, w1 = worker(url, "m-tp", 0, 2), worker(url, "m-tp", 1, 2)
    s = scheduler(url, "m-tp", world=2)
    try:
        # one process plays two ranks: rank 1 takes the id of a live process (the parent), as
        # the server frees an instance whose pid is gone
        w1.instance_id = os.getppid()
        w0.link.instance_id, w1.link.instance_id = w0.instance_id, w1.instance_id
        w0.register_kv_caches(kv0)
        w1.register_kv_caches(kv1)
        tokens = list(range(300, 332))
        store(w0, "a", tokens, list(range(1, 9)))
        assert lookup(s, "b", tokens) == 0                     # rank 1 has nothing yet
        store(w1, "a2", tokens[:16], list(range(1, 5)))
        assert lookup(s, "c", tokens) == 16                    # min over the ranks
        assert retrieve(w1, "c", tokens, list(range(10, 18)), end=16) == set()
        assert same(kv1, [1, 2, 3, 4], [10, 11, 12, 13])
    finally:
        for a in (w0, w1):
            a.shutdown()
        s.close()


def test_store_from_unknown_instance_is_false_and_hash_keys_refused(url):
    client = MessageQueueClient(url, zmq.Context.instance(), timeout=10)
    try:
        key = IPCCacheEngineKey("m-x", 1, 0, tuple(range(16)), 0, 16, "r")
        handle, ok = client.submit_request(RequestType.STORE, [[key], 424242, [1, 2, 3, 4], b""]).result(10)
        assert (handle, ok) == (b"", False)
        _, oks = client.submit_request(RequestType.RETRIEVE, [[key], 424242, [1, 2, 3, 4], b""]).result(10)
        assert oks == [False]
        hash_key = IPCCacheEngineKey("m-x", 1, None, chunk_hash=b"\x01" * 8, request_id="h")
        with pytest.raises(Exception, match="token-mode"):
            client.submit_request(RequestType.LOOKUP, [[hash_key]]).result(10)
        beat = client.submit_request(RequestType.HEARTBEAT, [424242, "worker"]).result(10)
        assert beat["registered"] is False and beat["chunk_size"] == CHUNK
        assert beat["counters"]["unknown_instance"] >= 2
    finally:
        client.close()


def test_offload_from_a_process_without_connector_then_vllm_retrieves(url):
    """OffloadServer: KV sent by value ([2, L, T, H, D]) is found by the adapter's lookup and
    loaded into the paged cache exactly."""
    tokens = list(range(700, 732))
    gen = torch.Generator().manual_seed(9)
    kv = torch.randn(2, L, 32, H, D, generator=gen)
    offloader = OffloadClient(url, timeout=10)
    w, s = worker(url, "m-off"), scheduler(url, "m-off")
    try:
        assert offloader.offload("m-off", tokens, kv) == 32
        bf16 = kv.to(torch.bfloat16)
        assert offloader.offload("m-off-bf16", tokens, bf16) == 32
        with pytest.raises(Exception, match="multiple of chunk_size"):
            offloader.offload("m-off", tokens, kv[:, :, :24], start=8)
        with pytest.raises(ValueError, match="5-D"):
            offloader.offload("m-off", tokens, kv[0])
        raw = MessageQueueClient(url, zmq.Context.instance(), timeout=10)
        key = IPCCacheEngineKey("m-off", 1, 0, tuple(tokens), 0, 32, None)
        with pytest.raises(Exception, match="2 bytes, shape"):
            raw.submit_request(RequestType.OFFLOAD, [key, "float32", list(kv.shape), b"xx"]).result(10)
        raw.close()
        caches = kv_caches(10)
        w.register_kv_caches(caches)
        assert lookup(s, "r", tokens) == 32
        assert retrieve(w, "r", tokens, list(range(40, 48))) == set()
        for layer, t in enumerate(caches.values()):
            # cpu_packed page [H, N, 2D] read as [H, 2N, D]: rows 0..N-1 = K, N..2N-1 = V
            pages = t[40:48].reshape(8, H, 2, N, D)
            k = pages[:, :, 0].permute(0, 2, 1, 3).reshape(32, H, D)
            v = pages[:, :, 1].permute(0, 2, 1, 3).reshape(32, H, D)
            assert torch.equal(k, kv[0, layer]) and torch.equal(v, kv[1, layer])
    finally:
        offloader.close()
        w.shutdown()
        s.close()
