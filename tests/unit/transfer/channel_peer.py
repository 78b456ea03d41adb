"""A channel peer in its own (spawned) process, driven over a multiprocessing Pipe.

Commands (tuples): ("md",) -> metadata bytes; ("add", md) -> peer name; ("fill", off, n, seed);
("bytes", off, n) -> bytes; ("notifs", wait_s) -> list of (peer, msg) (waits for >= 1);
("write", peer, local, remote, notify) -> None or error text; ("stop",).
"""

from __future__ import annotations

import time


def pattern(n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def serve(conn, kind: str, name: str, region_bytes: int) -> None:
    import torch

    if kind == "nixl":
        from lmcache.transfer.nixl import NixlChannel

        region = torch.zeros(region_bytes, dtype=torch.uint8)
        ch = NixlChannel(name, [region], timeout_s=3.0)
    else:
        from lmcache.transfer.cuda_ipc import CudaIpcChannel

        region = torch.zeros(region_bytes, dtype=torch.uint8, device="cuda")
        ch = CudaIpcChannel(name, [region], timeout_s=3.0)
    conn.send(("ready", ch.agent_metadata()))
    while True:
        cmd = conn.recv()
        op = cmd[0]
        try:
            if op == "add":
                conn.send(ch.add_peer(cmd[1]))
            elif op == "fill":
                _, off, n, seed = cmd
                region[off:off + n] = pattern(n, seed).to(region.device)
                conn.send(None)
            elif op == "bytes":
                _, off, n = cmd
                conn.send(region[off:off + n].cpu().numpy().tobytes())
            elif op == "notifs":
                end = time.monotonic() + cmd[1]
                got = ch.poll_notifications()
                while not got and time.monotonic() < end:
                    time.sleep(0.001)
                    got = ch.poll_notifications()
                conn.send(got)
            elif op == "write":
                _, peer, local, remote, notify = cmd
                ch.write(peer, local, remote, notify=notify)
                conn.send(None)
            elif op == "stop":
                ch.close()
                conn.send(None)
                return
        except Exception as e:  # reported to the test
            conn.send(f"{type(e).__name__}: {e}")
