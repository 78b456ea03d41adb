"""SessionManager alone: registration, heartbeats, request pins and the death of instances
(heartbeat timeout, pid gone) and clients."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from lmcache.mp_server.gpu_cache_context import GPUCacheContext, layout_of
from lmcache.mp_server.session_manager import SessionManager
from lmcache.v1.multiprocess.custom_types import CudaIPCWrapper


def ctx(instance_id: int) -> GPUCacheContext:
    return GPUCacheContext(instance_id, [CudaIPCWrapper(torch.zeros(8, 2, 4, 6)) for _ in range(2)])


def test_context_layout_and_slots():
    c = ctx(1)
    assert (c.layout.kind, c.block_size, c.layout.num_kv_heads, c.layout.head_size) == ("cpu_packed", 4, 2, 3)
    assert c.slots([5, 2], 6).tolist() == [20, 21, 22, 23, 8, 9]
    with pytest.raises(ValueError, match="6 tokens need 2 blocks of 4, got 1"):
        c.slots([5], 6)
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        c.slots([8], 2)
    assert layout_of(torch.zeros(2, 8, 4, 2, 3)).kind == "legacy_5d"
    with pytest.raises(ValueError, match="expected"):
        layout_of(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="layer 1 is float32 \\(8, 2, 4, 4\\)"):
        GPUCacheContext(1, [CudaIPCWrapper(torch.zeros(8, 2, 4, 6)),
                            CudaIPCWrapper(torch.zeros(8, 2, 4, 4))])
    with pytest.raises(ValueError, match="registered no KV cache"):
        GPUCacheContext(1, [])


def test_heartbeat_timeout_frees_instance_and_client_requests():
    sm = SessionManager(timeout=0.2)
    sm.register(os.getpid(), ctx(os.getpid()))
    sm.touch(b"worker", os.getpid(), heartbeat=True)
    sm.touch(b"sched", None, heartbeat=True)
    sm.note_lookup(b"sched", "req-1", ["engine-a"], 256)
    sm.note_lookup(b"sched", "req-1", ["engine-a", "engine-b"], 512)
    assert sm.requests["req-1"].engines == ["engine-a", "engine-b"]
    assert sm.requests["req-1"].hit_tokens == 512
    assert sm.reap() == ([], [])
    later = time.monotonic() + 1.0
    dead, requests = sm.reap(later)
    assert dead == [os.getpid()] and [r.request_id for r in requests] == ["req-1"]
    assert sm.instances == {} and sm.requests == {} and sm.clients == {}


def test_instance_without_heartbeats_dies_with_its_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    sm = SessionManager(timeout=0.1)
    sm.register(child.pid, ctx(child.pid))
    sm.register(os.getpid(), ctx(os.getpid()))
    dead, _ = sm.reap(time.monotonic() + 10)          # no heartbeats: only the pid decides
    assert dead == [child.pid] and list(sm.instances) == [os.getpid()]
    assert SessionManager(check_pids=False).reap() == ([], [])


def test_end_request_and_reregistration():
    sm = SessionManager()
    assert sm.register(7, ctx(7)) is None
    old = sm.register(7, ctx(7))
    assert old is not None and sm.instances[7].generation == old.generation + 1
    sm.note_lookup(b"c", "r", ["e"], 16)
    assert sm.end_request("r").engines == ["e"] and sm.end_request("r") is None
    assert sm.clients[b"c"].requests == set()
    with pytest.raises(ValueError, match="timeout must be > 0"):
        SessionManager(timeout=0)


def test_server_command_line_refuses_what_it_cannot_run(capsys):
    from lmcache.mp_server.__main__ import bind_url, main, parse_args

    assert bind_url(parse_args([])) == "tcp://127.0.0.1:5555"
    assert bind_url(parse_args(["--host", "*", "--port", "6000"])) == "tcp://*:6000"
    assert main(["--port", "0"]) == 2
    from lmcache.config.compose import compose_config
    from lmcache.mp_server.__main__ import check_mp_config

    check_mp_config(compose_config(["blend=cacheblend"]))  # the BlendServer runs it
    assert main(["gpu_connector=vllm_buffer_layerwise"]) == 2
    assert "vllm_paged or vllm_layerwise" in capsys.readouterr().err
    assert main(["chunk_sise=5"]) == 2
    assert "chunk_size" in capsys.readouterr().err
    # a bad value of a top-level key, and an address that cannot be listened on: one line, 2
    assert main(["max_local_cpu_size=-1"]) == 2
    assert "config key max_local_cpu_size=-1" in capsys.readouterr().err
    assert main(["--host", "256.1.1.1", "--port", "5555"]) == 2
    err = capsys.readouterr().err
    assert "lmcache-mp-server: cannot listen" in err and "256.1.1.1" in err, err
