#!/usr/bin/env python3
"""Transfer channel throughput between two processes vs the same machine's measured ceiling.

Two processes (multiprocessing spawn): this one (agent A) and a peer (agent B), each with one
registered region of ``--chunks`` x ``--chunk-mib`` MiB (32 MiB = one 256-token chunk of an
8B-shaped KV). A ``write`` (and a ``read``) moves every chunk (one desc per chunk, one call) to the
peer; the time of each call is measured, median of ``--reps`` after one warm-up.

Ceilings, measured in the same run on the same buffers:
  nixl (host memory, NIXL's UCX backend):
    memcpy   libc memcpy of the same bytes in one process, one thread (what a copy costs);
    cma      process_vm_writev / process_vm_readv of the same bytes straight into / out of the
             peer's region (Linux cross-memory attach: one copy between processes, the mechanism
             UCX's shared-memory transport uses for large messages). ucx-py is not installed,
             so this is the raw cross-process copy in place of a raw UCX transfer.
  cuda_ipc (GPU memory, two processes on one GPU):
    d2d      torch ``copy_`` device to device of the same bytes in one process (cudaMemcpy D2D),
             one call for all bytes and one call per chunk.
  bare copy_ (cuda_ipc): ``copy_`` of the same bytes straight into / out of the peer's region
             as this process opened it (no channel code): the IPC memory's own copy rate;
             "side stream": the same queued as the channel queues it (on a second stream
             after the current one, completion event polled without sleeping), no desc work;
             "event spin": on the current stream, completion event polled without sleeping.
The ratio is channel GB/s over the best ceiling (target >= 0.80). With several ``--chunks``
sizes a fixed cost per call and a bandwidth are fitted through the smallest and largest.

Usage:  python scripts/bench_transfer.py [--channel nixl|cuda_ipc] [--chunks 8] [--json out.json]
GPU:    python scripts/bench_transfer.py --channel cuda_ipc --chunks 64 256  (2 GiB = 16k tokens of 8B; 8 GiB)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

MiB = 1 << 20


def _make_channel(kind: str, name: str, nbytes: int, spin_s=None):
    import torch

    if kind == "nixl":
        from lmcache.transfer.nixl import NixlChannel

        region = torch.empty(nbytes, dtype=torch.uint8)
        region.fill_(7)  # touch every page
        return NixlChannel(name, [region], timeout_s=60.0), region
    from lmcache.transfer.cuda_ipc import CudaIpcChannel

    region = torch.full((nbytes,), 7, dtype=torch.uint8, device="cuda")
    extra = {} if spin_s is None else {"spin_s": spin_s}
    return CudaIpcChannel(name, [region], timeout_s=60.0, **extra), region


def _peer(conn, kind: str, nbytes: int) -> None:
    ch, region = _make_channel(kind, "bench-b", nbytes)
    conn.send((ch.agent_metadata(), os.getpid(), region.data_ptr()))
    while True:
        cmd = conn.recv()
        if cmd[0] == "add":
            conn.send(ch.add_peer(cmd[1]))
        elif cmd[0] == "checksum":
            conn.send(_checksum(region, cmd[1]))
        elif cmd[0] == "stop":
            ch.close()
            conn.send(None)
            return


def _checksum(region, n: int, step: int = 256 * MiB) -> int:
    """Sum of the first n bytes, in steps (a whole-region int64 sum would need 8x its bytes)."""
    import torch

    return sum(int(region[o:min(n, o + step)].sum(dtype=torch.int64)) for o in range(0, n, step))


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _cma(pid: int, local: int, remote: int, n: int, write: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.process_vm_writev if write else libc.process_vm_readv
    done = 0
    while done < n:
        lv, rv = _IoVec(local + done, n - done), _IoVec(remote + done, n - done)
        got = fn(pid, ctypes.byref(lv), 1, ctypes.byref(rv), 1, 0)
        if got < 0:
            raise OSError(ctypes.get_errno(), "process_vm_*v failed")
        done += got


def _fit(sizes: list, times: list) -> tuple[float, float]:
    """(fixed seconds per call, GB/s) of t = fixed + bytes / bandwidth through the smallest
    and the largest size."""
    (b1, t1), (b2, t2) = (sizes[0], times[0]), (sizes[-1], times[-1])
    if t2 <= t1:
        return float("nan"), float("nan")
    bw = (b2 - b1) / (t2 - t1)
    return t1 - b1 / bw, bw / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channel", choices=["nixl", "cuda_ipc"], default="nixl")
    p.add_argument("--chunk-mib", type=int, default=32)
    p.add_argument("--chunks", type=int, nargs="+", default=[8],
                   help="chunks per call; several sizes (e.g. 64 256) are measured in one run "
                        "and a fixed cost per call + bandwidth is fitted through them")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--spin-s", type=float, default=None,
                   help="cuda_ipc: CudaIpcChannel spin_s (default: the channel's; 0: poll the "
                        "copy's event with sleeps only)")
    p.add_argument("--scatter", action="store_true",
                   help="remote descs in reverse chunk order (no two adjacent: one copy per chunk)")
    a = p.parse_args(argv)
    import torch

    chunk = a.chunk_mib * MiB
    sizes = sorted(set(a.chunks))
    if sizes[0] < 1:
        p.error(f"--chunks must be >= 1, got {a.chunks}")
    nbytes = chunk * sizes[-1]
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_peer, args=(child, a.channel, nbytes), daemon=True)
    proc.start()
    md, peer_pid, peer_addr = conn.recv()
    ch, region = _make_channel(a.channel, "bench-a", nbytes, a.spin_s)
    peer = ch.add_peer(md)
    conn.send(("add", ch.agent_metadata()))
    conn.recv()
    region.random_(0, 256)
    other = torch.empty_like(region)
    other.fill_(1)
    sync = torch.cuda.synchronize if a.channel == "cuda_ipc" else None
    libc = ctypes.CDLL(None)
    libc.memcpy.restype = ctypes.c_void_p
    results = []
    for n in sizes:
        nb = n * chunk
        descs = [(i * chunk, chunk) for i in range(n)]
        remote = list(reversed(descs)) if a.scatter else descs
        paths = {"channel write": lambda: ch.write(peer, descs, remote),
                 "channel read": lambda: ch.read(peer, descs, remote)}
        if a.channel == "nixl":
            paths["ceiling memcpy (1 thread)"] = lambda: libc.memcpy(
                ctypes.c_void_p(other.data_ptr()), ctypes.c_void_p(region.data_ptr()), ctypes.c_size_t(nb))
            paths["ceiling cma write"] = lambda: _cma(peer_pid, region.data_ptr(), peer_addr, nb, True)
            paths["ceiling cma read"] = lambda: _cma(peer_pid, region.data_ptr(), peer_addr, nb, False)
        else:
            # the peer's region as this process opened it (the channel's own view): a bare
            # copy_ into / out of it separates the channel's per-call work from the IPC memory
            theirs = ch._peers[peer]["tensors"][0]
            mine, out = region[:nb], other[:nb]
            paths["bare copy_ into the peer (one call)"] = lambda: theirs[:nb].copy_(mine)
            paths["bare copy_ from the peer (one call)"] = lambda: mine.copy_(theirs[:nb])
            side = torch.cuda.Stream()

            def side_stream(dst, src):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    dst.copy_(src, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(side)
                while not done.query():
                    pass
            def current_stream(dst, src):
                dst.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream())
                while not done.query():
                    pass
            paths["bare copy_ into the peer, side stream"] = lambda: side_stream(theirs[:nb], mine)
            paths["bare copy_ into the peer, event spin"] = lambda: current_stream(theirs[:nb], mine)
            paths["ceiling d2d copy_ (one call)"] = lambda: out.copy_(mine)

            def per_chunk(descs=descs):
                for o, m in descs:
                    other[o:o + m].copy_(region[o:o + m])
            paths["ceiling d2d copy_ (per chunk)"] = per_chunk
        ch.write(peer, descs, remote)
        conn.send(("checksum", nb))  # (scattered: the same chunks in another order)
        assert conn.recv() == _checksum(region, nb), "peer bytes differ after write"
        # round robin: every rep times each path once, so that drifting machine load hits all alike
        times: dict[str, list[float]] = {k: [] for k in paths}
        for rep in range(a.reps + 1):
            for name, fn in paths.items():
                if sync:
                    sync()
                t0 = time.perf_counter()
                fn()
                if sync:
                    sync()
                if rep:  # the first round is a warm-up
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows = {k: nb / v / 1e9 for k, v in med.items()}
        ceiling = max(v for k, v in rows.items() if k.startswith("ceiling"))
        print(f"channel={a.channel} bytes={nb / MiB:.0f} MiB in {n} x {a.chunk_mib} MiB descs, "
              f"median of {a.reps}, paths timed round robin{', remote descs scattered' if a.scatter else ''}")
        print(f"{'path':38s} {'ms':>8s} {'GB/s':>8s} {'x ceiling':>10s}")
        for k, v in rows.items():
            print(f"{k:38s} {med[k] * 1e3:8.3f} {v:8.2f} {v / ceiling:10.2f}")
        print()
        results.append({"chunks": n, "bytes": nb, "median_s": med, "gbps": rows,
                        "ceiling_gbps": ceiling, "write_ratio": rows["channel write"] / ceiling,
                        "read_ratio": rows["channel read"] / ceiling})
    fits = {}
    if len(sizes) > 1:
        print(f"fit t = fixed + bytes / bandwidth through {sizes[0]} and {sizes[-1]} chunks")
        print(f"{'path':38s} {'fixed us':>9s} {'GB/s':>8s}")
        for k in results[0]["median_s"]:
            fixed, bw = _fit([r["bytes"] for r in results], [r["median_s"][k] for r in results])
            fits[k] = {"fixed_us": fixed * 1e6, "gbps": bw}
            print(f"{k:38s} {fixed * 1e6:9.1f} {bw:8.2f}")
    ch.close()  # (before the peer exits: its memory is still mapped here until then)
    conn.send(("stop",))
    conn.recv()
    proc.join(10)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"channel": a.channel, "scatter": a.scatter, "chunk_bytes": chunk,
                       "reps": a.reps, "spin_s": a.spin_s, **results[0], "sizes": results, "fit": fits}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
