"""CudaIpcChannel's lean per-call path between two GPU processes (device only): copies exact
for merged, scattered, repeated (planned once) and odd-sized descs; byte offsets into a bf16
region; a bad desc named; a peer registering host memory or a bad spin_s refused."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

from channel_peer import pattern, serve  # noqa: E402

from lmcache.transfer.base import RegionInfo, pack_metadata  # noqa: E402
from lmcache.transfer.cuda_ipc import CudaIpcChannel  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def peer():
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child, "cuda_ipc", "lean-b", 8 * MiB), daemon=True)
    proc.start()
    assert conn.poll(60), "peer process did not start"
    tag, md = conn.recv()
    assert tag == "ready"
    yield conn, md
    conn.send(("stop",))
    conn.poll(10)
    proc.join(10)


def _call(conn, *cmd):
    conn.send(cmd)
    assert conn.poll(10), f"peer did not answer {cmd[0]}"
    return conn.recv()


@pytest.mark.parametrize("spin_s", [0.02, 0.0])
def test_writes_and_reads_are_exact(peer, spin_s):
    conn, md = peer
    region = torch.zeros(4 * MiB, dtype=torch.uint8, device="cuda")
    with CudaIpcChannel(f"lean-a-{spin_s}", [region], timeout_s=3.0, spin_s=spin_s) as ch:
        name = ch.add_peer(md)
        assert _call(conn, "add", ch.agent_metadata()) == ch.name
        src = pattern(4 * MiB, 11).cuda()
        region.copy_(src)
        chunk = 64 * KiB
        merged = [(i * chunk, chunk) for i in range(16)]  # one copy
        scattered = [(i * chunk, chunk) for i in reversed(range(16))]  # 16 copies
        for _ in range(2):  # the second call reuses the planned views
            ch.write(name, merged, scattered)
        want = b"".join(src[i * chunk:(i + 1) * chunk].cpu().numpy().tobytes()
                        for i in reversed(range(16)))
        assert _call(conn, "bytes", 0, 16 * chunk) == want
        odd = [(3, 1001), (1005, 7), (2 * MiB + 1, 12345)]  # odd offsets and lengths
        ch.write(name, odd, [(5 * MiB + 9, 1001), (6 * MiB, 7), (7 * MiB + 3, 12345)])
        for (lo, n), ro in zip(odd, (5 * MiB + 9, 6 * MiB, 7 * MiB + 3)):
            assert _call(conn, "bytes", ro, n) == src[lo:lo + n].cpu().numpy().tobytes()
        assert _call(conn, "fill", 0, 2 * MiB, 12) is None
        region.zero_()
        ch.read(name, [(0, MiB), (MiB, MiB)], [(MiB, MiB), (0, MiB)])
        theirs = pattern(2 * MiB, 12)
        assert torch.equal(region[:MiB].cpu(), theirs[MiB:])
        assert torch.equal(region[MiB:2 * MiB].cpu(), theirs[:MiB])
        assert int(region[2 * MiB:].count_nonzero()) == 0
        with pytest.raises(ValueError, match="remote desc 0 .* outside region 0"):
            ch.read(name, [(0, 64)], [(8 * MiB - 8, 64)])
        with pytest.raises(ValueError, match="local length 64 != remote length 32"):
            ch.read(name, [(0, 64)], [(0, 32)])


def test_byte_offsets_into_a_bf16_region(peer):
    conn, md = peer
    region = torch.zeros(MiB, dtype=torch.bfloat16, device="cuda")  # 2 MiB of bytes
    with CudaIpcChannel("lean-bf16", [region], timeout_s=3.0) as ch:
        name = ch.add_peer(md)
        assert _call(conn, "fill", 0, 4096, 13) is None
        ch.read(name, [(MiB + 2, 4096)], [(0, 4096)])  # bytes, past the first half
        got = region.view(torch.uint8)[MiB + 2:MiB + 2 + 4096].cpu()
        assert torch.equal(got, pattern(4096, 13))
        assert int(region.view(torch.uint8)[:MiB + 2].count_nonzero()) == 0


def test_a_peer_registering_host_memory_is_refused():
    region = torch.zeros(MiB, dtype=torch.uint8, device="cuda")
    with CudaIpcChannel("lean-c", [region], timeout_s=3.0) as ch:
        md = pack_metadata("host-peer", "cuda_ipc", [RegionInfo(4096, 64, 0, "DRAM")],
                           ipc=[[[0], 0]], notify="tcp://127.0.0.1:9", pid=1)
        with pytest.raises(ValueError, match="not CUDA memory"):
            ch.add_peer(md)
        with pytest.raises(ValueError, match="spin_s >= 0"):
            CudaIpcChannel("lean-d", [region], spin_s=-1)
