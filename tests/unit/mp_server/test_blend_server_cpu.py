"""The BlendServer (``python -m lmcache.mp_server blend=cacheblend``) in its own process, driven
by lmcache's MP adapter on CPU (KV caches in shared memory, the CPU stand-in of CUDA IPC):
segments stored alone are found at new positions, loaded into exactly their slots, V bit-exact
and K equal to RoPE at the new positions (float64 reference) within float32 rounding."""

from __future__ import annotations

import pytest
import torch
import zmq

from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv
from lmcache.integration.vllm.vllm_multi_process_adapter import (
    LMCacheMPWorkerAdapter, ParallelStrategy)
from lmcache.mp_server.gpu_cache_context import layout_of
from lmcache.v1.multiprocess.mq import MessageQueueClient, MPRequestError
from lmcache.v1.multiprocess.protocol import RequestType
from mp_server_proc import free_port, start_server, stop_server
from reference_rope import rope_at

N, L, H, D, B = 4, 2, 2, 8, 64          # block size, layers, kv heads, head size, blocks
SEP = [9999, 9998]                     # the separator's token ids (blend_special_str)
ROPE = {"rope_theta": 10000.0}
SYS = list(range(100, 105))            # 5 tokens
DOC_A = list(range(200, 210))          # 10 tokens
DOC_B = list(range(300, 307))          # 7 tokens


@pytest.fixture(scope="module")
def url():
    port = free_port()
    proc = start_server(port, ["blend=cacheblend", "chunk_size=16", "max_local_cpu_size=0.05",
                               f"token_database.separator_tokens=[{SEP[0]},{SEP[1]}]"])
    yield f"tcp://localhost:{port}"
    assert stop_server(proc) == 0


@pytest.fixture
def worker(url, request):
    w = LMCacheMPWorkerAdapter(url, zmq.Context.instance(), f"m-{request.node.name}", N,
                               ParallelStrategy(False, 1, 0, 1, 0, 1, 1), mq_timeout=10,
                               heartbeat_interval=0.5)
    gen = torch.Generator().manual_seed(7)
    whole = torch.randn(L, B, H, N, 2 * D, generator=gen)  # one allocation, per-layer views
    w.kv = {f"layers.{i}.attn": whole[i] for i in range(L)}
    w.register_kv_caches(w.kv)
    yield w
    w.shutdown()


def slots_of(blocks: list[int], n: int) -> torch.Tensor:
    return (torch.tensor(blocks)[:, None] * N + torch.arange(N)).flatten()[:n]


def layers(w) -> list[torch.Tensor]:
    return list(w.kv.values())


def prefill(w, blocks: list[int], n: int, raw_k: torch.Tensor, v: torch.Tensor) -> None:
    """Write what an engine's prefill of ``n`` tokens at positions 0..n-1 writes: K = RoPE(raw
    K at its position) ([L, n, H, D] raw), V as given ([L, n, H, D])."""
    pos = torch.arange(n)
    k = torch.stack([rope_at(raw_k[l], pos) for l in range(L)])
    kv = torch.stack([k.reshape(L, n, H * D), v.reshape(L, n, H * D)])
    scatter_kv(layers(w), slots_of(blocks, n), layout_of(layers(w)[0]), kv)


def doc_kv(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(L, n, H, D, generator=gen), torch.randn(L, n, H, D, generator=gen)


def read(w, blocks: list[int], n: int) -> torch.Tensor:
    return gather_kv(layers(w), slots_of(blocks, n), layout_of(layers(w)[0]))  # [2, L, n, H*D]


def blend_stats(url) -> dict:
    client = MessageQueueClient(url, zmq.Context.instance(), timeout=10)
    try:
        return client.submit_request(RequestType.HEARTBEAT, [None]).result(10)["blend"]
    finally:
        client.close()


def test_segments_found_at_new_positions_and_loaded_with_rope(worker, url):
    w = worker
    (ka, va), (kb, vb) = doc_kv(1, len(DOC_A)), doc_kv(2, len(DOC_B))
    prefill(w, [1, 2, 3], len(DOC_A), ka, va)
    assert w.cb_store(DOC_A, [1, 2, 3]) == 1
    assert w.cb_store(DOC_A, [1, 2, 3]) == 0                   # already cached
    prefill(w, [5, 6], len(DOC_B), kb, vb)
    assert w.cb_store(DOC_B, [5, 6]) == 1

    prompt = SYS + SEP + DOC_B + SEP + DOC_A + SEP + [7, 8, 9]
    sb = len(SYS) + 2
    sa = sb + len(DOC_B) + 2
    hits = w.cb_lookup("r1", prompt)
    assert hits == [(sb, sb + len(DOC_B), 0), (sa, sa + len(DOC_A), 0)]
    assert blend_stats(url)["pinned_requests"] == 1

    dst = list(range(20, 20 + -(-len(prompt) // N)))
    before = read(w, dst, len(prompt)).clone()
    assert w.cb_retrieve("r1", prompt, dst, hits, ROPE) == [True, True]
    after = read(w, dst, len(prompt))
    stats = blend_stats(url)
    assert stats["pinned_requests"] == 0 and stats["retrieved_segments"] == 2

    loaded = torch.zeros(len(prompt), dtype=torch.bool)
    for (s, e, _), (k_raw, v) in zip(hits, [(kb, vb), (ka, va)]):
        loaded[s:e] = True
        assert torch.equal(after[1, :, s:e], v.reshape(L, e - s, H * D))      # V bit-exact
        new_pos = torch.arange(s, e)
        want = torch.stack([rope_at(k_raw[l], new_pos) for l in range(L)])
        torch.testing.assert_close(after[0, :, s:e], want.reshape(L, e - s, H * D),
                                   atol=1e-5, rtol=1e-5)
        assert not torch.allclose(after[0, :, s:e], torch.stack(
            [rope_at(k_raw[l], torch.arange(e - s)) for l in range(L)]).reshape(L, e - s, H * D))
    assert torch.equal(after[:, :, ~loaded], before[:, :, ~loaded])         # gaps untouched


def test_unknown_segments_miss_and_leave_kv_untouched(worker, url):
    w = worker
    k, v = doc_kv(3, len(DOC_A))
    prefill(w, [1, 2, 3], len(DOC_A), k, v)
    assert w.cb_store(DOC_A, [1, 2, 3]) == 1
    other = SYS + SEP + [400, 401, 402] + SEP + DOC_A[:-1]      # no segment cached as is
    assert w.cb_lookup("r2", other) == []
    dst = [40, 41, 42, 43, 44, 45]
    before = read(w, dst, len(other)).clone()
    assert w.cb_retrieve("r2", other, dst, [[7, 10], [12, len(other)]], ROPE) == [False, False]
    assert torch.equal(read(w, dst, len(other)), before)
    salted = w.cb_lookup("r3", SEP + DOC_A, cache_salt="tenant-1")  # a salt is another cache
    assert salted == []
    w.mq_client.submit_request(RequestType.END_SESSION, ["r2"]).result(10)


def test_bad_input_is_named(worker, url):
    w = worker
    prompt = SEP + DOC_A
    with pytest.raises(MPRequestError, match="ranges must be a list of \\[start, end\\]"):
        w.cb_retrieve("r4", prompt, [1, 2, 3], [[5, 2]], ROPE)
    with pytest.raises(MPRequestError, match="RoPE type 'yarn'"):
        w.cb_retrieve("r4", prompt, [1, 2, 3], [[2, 12]], {"rope_type": "yarn"})
    client = MessageQueueClient(url, zmq.Context.instance(), timeout=10)
    try:
        with pytest.raises(MPRequestError, match="CB_LOOKUP takes \\[one token-mode key\\]"):
            client.submit_request(RequestType.CB_LOOKUP, [[1, 2]]).result(10)
        with pytest.raises(MPRequestError, match="CB_STORE takes 4 payloads"):
            client.submit_request(RequestType.CB_STORE, [1]).result(10)
    finally:
        client.close()
    # too few blocks for the prompt: a miss (False), never a partial write
    assert w.cb_retrieve("r5", prompt, [1], [[2, 12]], ROPE) == [False]
