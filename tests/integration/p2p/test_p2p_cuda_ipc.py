"""The P2P tier between two GPU processes of one host over CUDA IPC (device only):
``allocator=gpu transfer_channel=cuda_ipc deployment=p2p`` built by the container in both
processes; instance B pulls A's chunks GPU to GPU through ``P2PBackend.batched_get_blocking``
(exact bytes), and a peer killed between acquire and read costs a miss within the deadline.
A real CacheController runs in this process (A registered in its index)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from p2p_gpu_peer import build, chunk, keys, serve  # noqa: E402

from lmcache.containers import shutdown  # noqa: E402
from lmcache.controller.cache_controller import CacheController  # noqa: E402
from lmcache.controller.chunk_index import WorkerInfo  # noqa: E402
from lmcache.controller.index.memory import MemoryChunkIndex  # noqa: E402
from lmcache.controller.protocol import ADMIT  # noqa: E402
from lmcache.memory.gpu import GPUMemoryAllocator  # noqa: E402
from lmcache.token_database.chunked import ChunkedTokenDatabase  # noqa: E402
from lmcache.transfer.cuda_ipc import CudaIpcChannel  # noqa: E402

N = 6


def test_b_pulls_exact_kv_from_a_gpu_to_gpu_and_a_killed_peer_is_a_miss():
    ctl = CacheController(MemoryChunkIndex(), ChunkedTokenDatabase(None, chunk_size=16),
                          controller_host="127.0.0.1",
                          controller_monitor_ports={"pull": 0, "reply": 0})
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child, ctl.reply_port, N), daemon=True)
    proc.start()
    container = None
    try:
        assert conn.poll(120), "peer A did not start"
        tag, url, a_device, a_kind = conn.recv()
        assert (tag, a_device, a_kind) == ("ready", "cuda:0", "cuda_ipc")
        container, (cpu, p2p) = build("B", ctl.reply_port)
        assert isinstance(cpu.allocator, GPUMemoryAllocator)
        assert isinstance(p2p.channel, CudaIpcChannel)
        assert p2p.channel.regions[0].data_ptr() == cpu.allocator.buffer.data_ptr()
        ks = keys(N)
        ctl.index.register(WorkerInfo("A", 0, "127.0.0.1", 1, peer_init_url=url,
                                      last_heartbeat_time=time.time(), tiers=["LocalCPUBackend"]))
        ctl.index.apply("A", 0, "LocalCPUBackend", [(ADMIT, k.chunk_hash) for k in ks])

        assert p2p.batched_contains(ks) == N
        objs = p2p.batched_get_blocking(ks)
        assert all(o is not None for o in objs)
        for i, o in enumerate(objs):
            assert o.tensor.device.type == "cuda"
            assert torch.equal(o.tensor.cpu(), chunk(i)), f"chunk {i} differs"
            o.ref_count_down()
        assert p2p.stats["pulled_chunks"] == N and p2p.stats["pull_failures"] == 0
        assert cpu.allocator.num_active_allocations == 0

        def kill_a():  # between A's acquire and B's read
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)

        p2p.before_read = kill_a
        t0 = time.monotonic()
        assert p2p.batched_get_blocking(ks) == [None] * N
        assert time.monotonic() - t0 < 3.0 + 1.0
        assert not proc.is_alive()
        assert p2p.stats["pull_failures"] == 1
        assert p2p.stats["pulled_chunks"] == N
    finally:
        if proc.is_alive():
            conn.send("quit")
            conn.poll(30)
            proc.join(10)
        if container is not None:
            shutdown(container)
        ctl.close()
