"""CudaIpcChannel between two GPU processes of one host (device only)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

from channel_peer import pattern, serve  # noqa: E402

from lmcache.transfer import TransferError  # noqa: E402
from lmcache.transfer.cuda_ipc import CudaIpcChannel  # noqa: E402

MiB = 1 << 20


def _spawn(name: str, nbytes: int):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child, "cuda_ipc", name, nbytes), daemon=True)
    proc.start()
    assert parent.poll(60), "peer process did not start"
    tag, md = parent.recv()
    assert tag == "ready"
    return proc, parent, md


def _call(conn, *cmd, timeout=10):
    conn.send(cmd)
    assert conn.poll(timeout), f"peer did not answer {cmd[0]}"
    return conn.recv()


def test_cuda_ipc_write_read_notify_and_dead_peer():
    proc, conn, md = _spawn("gpu-b", 16 * MiB)
    region = torch.zeros(8 * MiB, dtype=torch.uint8, device="cuda")
    with CudaIpcChannel("gpu-a", [region], timeout_s=3.0) as ch:
        peer = ch.add_peer(md)
        assert _call(conn, "add", ch.agent_metadata()) == "gpu-a"
        src = pattern(3 * MiB + 5, 1).cuda()
        region[10:10 + src.numel()] = src
        ch.write(peer, [(10, 3 * MiB + 5)], [(MiB, 3 * MiB + 5)], notify=b"landed")
        assert _call(conn, "notifs", 3.0) == [("gpu-a", b"landed")]
        assert _call(conn, "bytes", MiB, 3 * MiB + 5) == src.cpu().numpy().tobytes()
        assert _call(conn, "fill", 9 * MiB, 4096, 9) is None
        ch.read(peer, [(0, 4096)], [(9 * MiB, 4096)])
        assert torch.equal(region[:4096].cpu(), pattern(4096, 9))
        assert _call(conn, "write", "gpu-a", [(0, 64)], [(64, 64)], b"back") is None
        end, got = time.monotonic() + 3, []
        while not got and time.monotonic() < end:
            got = ch.poll_notifications()
        assert got == [(peer, b"back")]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="gpu-b"):
            ch.write(peer, [(0, MiB)], [(0, MiB)])
        assert time.monotonic() - t0 < 3.5
