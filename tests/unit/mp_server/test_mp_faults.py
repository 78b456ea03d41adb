"""Faults of the MP mode with real processes: the server down when the engine starts (no hits,
a clear log, reconnection), a server restart (re-registration; nothing of the old server's
memory or mappings is used), an engine killed mid-request (its session, pins and KV cache
mappings are freed; what it stored stays valid)."""

from __future__ import annotations

import logging
import subprocess
import sys
import os

import torch
import zmq

from lmcache.integration.vllm.vllm_multi_process_adapter import (
    LMCacheMPSchedulerAdapter, LMCacheMPWorkerAdapter, LoadStoreOp, ParallelStrategy)
from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey
from lmcache.v1.multiprocess.mq import MessageQueueClient
from lmcache.v1.multiprocess.protocol import RequestType
from mp_server_proc import finished, free_port, lookup, start_server, stop_server, wait_until

N = 16                      # block size; chunk 256 (LMCache's default) = 16 blocks
PS = ParallelStrategy(False, 1, 0, 1, 0, 1, 1)
SERVER = ["max_local_cpu_size=0.05"]
FAST = ["--session-timeout", "3"]


def adapters(url, model, timeout=10.0):
    ctx = zmq.Context.instance()
    return (LMCacheMPWorkerAdapter(url, ctx, model, N, PS, mq_timeout=timeout, heartbeat_interval=0.2),
            LMCacheMPSchedulerAdapter(url, ctx, model, N, PS, mq_timeout=timeout, heartbeat_interval=0.2))


def heartbeat(url) -> dict:
    client = MessageQueueClient(url, zmq.Context.instance(), timeout=10)
    try:
        return client.submit_request(RequestType.HEARTBEAT, [None, "probe"]).result(10)
    finally:
        client.close()


def store(w, rid, tokens, blocks):
    w.batched_submit_store_requests([rid], [LoadStoreOp(blocks, tokens, start=0, end=len(tokens))], None)
    finished(w, rid, store=True)


def retrieve(w, rid, tokens, blocks):
    w.batched_submit_retrieve_requests([rid], [LoadStoreOp(blocks, tokens, start=0, end=len(tokens))], None)
    finished(w, rid, store=False)
    return w.get_block_ids_with_load_errors()


def test_server_down_at_start_runs_without_hits_then_reconnects(caplog):
    port = free_port()
    url = f"tcp://localhost:{port}"
    caplog.set_level(logging.WARNING)
    w, s = adapters(url, "m-down", timeout=1.5)
    proc = None
    try:
        assert not w.link.connected and not s.link.connected
        assert "did not answer" in caplog.text and "WITHOUT LMCache hits" in caplog.text
        kv = torch.randn(40, 1, N, 8)
        w.register_kv_caches({"l0": kv})                       # remembered, sent on reconnect
        tokens = list(range(256))
        assert lookup(s, "r1", tokens) == 0
        store(w, "r1", tokens, list(range(1, 17)))             # finishes at once: skipped
        assert retrieve(w, "r2", tokens, list(range(20, 36))) == set(range(20, 36))

        proc = start_server(port, SERVER)
        wait_until(lambda: w.link.connected and s.link.connected, timeout=15)
        wait_until(lambda: heartbeat(url)["instances"] == 1, timeout=15)   # re-registered
        assert "is back" in caplog.text
        store(w, "r3", tokens, list(range(1, 17)))
        assert lookup(s, "r4", tokens) == 256
        assert retrieve(w, "r4", tokens, list(range(20, 36))) == set()
        assert torch.equal(kv[1:17], kv[20:36])
    finally:
        w.shutdown()
        s.close()
        if proc is not None:
            stop_server(proc)


def test_server_restart_reregisters_and_never_serves_old_memory(caplog):
    port = free_port()
    url = f"tcp://localhost:{port}"
    proc = start_server(port, SERVER)
    w, s = adapters(url, "m-restart", timeout=2.0)
    try:
        kv = torch.randn(40, 1, N, 8, generator=torch.Generator().manual_seed(3))
        w.register_kv_caches({"l0": kv})
        tokens = list(range(1000, 1256))
        store(w, "a", tokens, list(range(1, 17)))
        assert lookup(s, "b", tokens) == 256
        epoch = w.link.epoch
        stop_server(proc, sig_kill=True)                       # crash: CPU tier gone
        wait_until(lambda: not w.link.connected, timeout=10)
        assert lookup(s, "c", tokens) == 0                     # disconnected: no hits
        proc = start_server(port, SERVER)
        wait_until(lambda: w.link.connected and s.link.connected and w.link.epoch != epoch, 15)
        wait_until(lambda: heartbeat(url)["instances"] == 1, timeout=15)
        assert lookup(s, "d", tokens) == 0                     # the new server has nothing
        assert retrieve(w, "d", tokens, list(range(20, 36))) == set(range(20, 36))
        store(w, "e", tokens, list(range(1, 17)))
        assert lookup(s, "f", tokens) == 256
        assert retrieve(w, "f", tokens, list(range(20, 36))) == set()
        assert torch.equal(kv[1:17], kv[20:36])
    finally:
        w.shutdown()
        s.close()
        stop_server(proc)


def test_engine_killed_mid_request_frees_session_pins_and_mappings():
    port = free_port()
    url = f"tcp://localhost:{port}"
    proc = start_server(port, SERVER, extra_args=FAST)
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        # stdout is read line by line, not to EOF: torch's shared-memory manager, which the
        # child starts, inherits the pipe and outlives the child
        child = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                  "dying_engine.py"), url], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        first = child.stdout.readline()
        assert child.wait(timeout=60) == -9 and first.strip() == "hit 256", first
        child.stdout.close()
        state = wait_until(lambda: (lambda h: h if h["instances"] == 0 and h["requests"] == 0
                                    and h["pinned_lookups"] == 0 else None)(heartbeat(url)), 15)
        assert state["counters"]["reaped_instances"] == 1
        assert state["counters"]["released_requests"] == 1
        # a request naming the dead instance is refused: its memory is never touched again
        client = MessageQueueClient(url, zmq.Context.instance(), timeout=10)
        key = IPCCacheEngineKey("m-die", 1, 0, tuple(range(256)), 0, 256, "late")
        assert client.submit_request(RequestType.STORE, [[key], child.pid, list(range(16)),
                                                         b""]).result(10)[1] is False
        client.close()
        # what the dead engine stored (copied out before it died) is still served, exactly
        w, s = adapters(url, "m-die")
        try:
            kv = torch.zeros(40, 1, N, 8)
            w.register_kv_caches({"l0": kv})
            assert lookup(s, "new", list(range(256))) == 256
            assert retrieve(w, "new", list(range(256)), list(range(20, 36))) == set()
            expected = torch.randn(1, 40, 1, 16, 8, generator=torch.Generator().manual_seed(42))[0]
            assert torch.equal(kv[20:36], expected[1:17])
        finally:
            w.shutdown()
            s.close()
    finally:
        stop_server(proc)
