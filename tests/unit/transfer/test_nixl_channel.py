"""NixlChannel through real NIXL/UCX between two processes (host memory)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch

pytest.importorskip("nixl_cu12", reason="NIXL (pip nixl-cu12) is not installed")

from channel_peer import pattern, serve  # noqa: E402

from lmcache.transfer import TransferError  # noqa: E402
from lmcache.transfer.nixl import NixlChannel  # noqa: E402

MiB = 1 << 20


def _spawn(name: str, region_bytes: int):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child, "nixl", name, region_bytes), daemon=True)
    proc.start()
    assert parent.poll(60), "peer process did not start"
    tag, md = parent.recv()
    assert tag == "ready"
    return proc, parent, md


def _call(conn, *cmd, timeout=10):
    conn.send(cmd)
    assert conn.poll(timeout), f"peer did not answer {cmd[0]}"
    return conn.recv()


@pytest.fixture(scope="module")
def pair():
    """(local channel A with two regions, peer conn, peer name); the peer B lives in a child process."""
    proc, conn, md = _spawn("peer-b", 16 * MiB)
    regions = [torch.zeros(8 * MiB, dtype=torch.uint8), torch.zeros(MiB, dtype=torch.uint8)]
    ch = NixlChannel("agent-a", regions, timeout_s=3.0)
    name = ch.add_peer(md)
    assert name == "peer-b"
    assert _call(conn, "add", ch.agent_metadata()) == "agent-a"
    yield ch, conn, name
    _call(conn, "stop")
    ch.close()
    proc.join(10)


def test_write_is_bit_exact_and_notifies_after_the_data(pair):
    ch, conn, peer = pair
    src = pattern(3 * MiB + 17, seed=1)
    ch.regions[0][100:100 + src.numel()] = src
    ch.write(peer, [(100, 2 * MiB), (100 + 2 * MiB, MiB + 17)],
             [(5 * MiB, 2 * MiB), (MiB, MiB + 17)], notify=b"req-1 done")
    assert _call(conn, "notifs", 3.0) == [("agent-a", b"req-1 done")]
    assert _call(conn, "bytes", 5 * MiB, 2 * MiB) == src[:2 * MiB].numpy().tobytes()
    assert _call(conn, "bytes", MiB, MiB + 17) == src[2 * MiB:].numpy().tobytes()


def test_read_into_a_second_region_is_bit_exact(pair):
    ch, conn, peer = pair
    assert _call(conn, "fill", 7 * MiB, 512 * 1024 + 3, 7) is None
    ch.read(peer, [(1, 4096, 512 * 1024 + 3)], [(7 * MiB, 512 * 1024 + 3)])
    assert torch.equal(ch.regions[1][4096:4096 + 512 * 1024 + 3], pattern(512 * 1024 + 3, 7))


def test_peer_writes_back_and_standalone_notification(pair):
    ch, conn, peer = pair
    assert _call(conn, "fill", 0, 65536, 3) is None
    assert _call(conn, "write", "agent-a", [(0, 65536)], [(0, 65536)], b"back") is None
    got = []
    end = time.monotonic() + 3
    while not got and time.monotonic() < end:
        got = ch.poll_notifications()
    assert got == [(peer, b"back")]
    assert torch.equal(ch.regions[0][:65536], pattern(65536, 3))
    ch.send_notification(peer, b"hello")
    assert _call(conn, "notifs", 3.0) == [("agent-a", b"hello")]


def test_bad_descs_and_unknown_peer_are_clear_errors(pair):
    ch, _, peer = pair
    with pytest.raises(ValueError, match="outside region 0 of 8388608 bytes"):
        ch.write(peer, [(8 * MiB - 10, 11)], [(0, 11)])
    with pytest.raises(ValueError, match="remote desc 0 .* outside region 0 of 16777216"):
        ch.read(peer, [(0, 16)], [(16 * MiB, 16)])
    with pytest.raises(ValueError, match="local length 16 != remote length 8"):
        ch.write(peer, [(0, 16)], [(0, 8)])
    with pytest.raises(ValueError, match="names region 2; there are 2 regions"):
        ch.write(peer, [(2, 0, 16)], [(0, 16)])
    with pytest.raises(TransferError, match="unknown peer 'nobody'"):
        ch.write("nobody", [(0, 16)], [(0, 16)])
    with pytest.raises(ValueError, match="not a msgpack map|not version-1"):
        ch.add_peer(b"\x01garbage")


def test_peer_killed_mid_transfer_raises_within_the_timeout():
    proc, conn, md = _spawn("peer-doomed", 64 * MiB)
    with NixlChannel("agent-k", [torch.ones(64 * MiB, dtype=torch.uint8)], timeout_s=1.5) as ch:
        peer = ch.add_peer(md)
        _call(conn, "add", ch.agent_metadata())
        outcome: dict = {"writes": 0}

        def writer():
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 20:
                    outcome["started"] = time.monotonic()
                    ch.write(peer, [(0, 64 * MiB)], [(0, 64 * MiB)])
                    outcome["writes"] += 1
            except TransferError as e:
                outcome["error"] = e
                outcome["ended"] = time.monotonic()

        t = threading.Thread(target=writer)
        t.start()
        while outcome["writes"] < 2:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        t.join(10)
        assert not t.is_alive(), "write hung after the peer died"
        assert isinstance(outcome.get("error"), TransferError)
        assert "peer-doomed" in str(outcome["error"])
        # the failing write started before or just after the kill and ended within its deadline
        assert outcome["ended"] - max(outcome["started"], killed) <= 1.5 + 1.0
        ch.remove_peer(peer)
        assert ch.peers == []
    proc.join(5)
