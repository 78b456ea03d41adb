#!/usr/bin/env python3
"""Host-memory P2P pull through the P2P tier vs the raw transfer channel and memcpy.

Two processes (multiprocessing spawn). The peer (instance A) holds ``--chunks`` chunks of
``--chunk-mib`` MiB (32 MiB = one 256-token chunk of an 8B-shaped KV: [2, 32, 256, 1024] bf16)
in its CPU tier and serves them through its P2PBackend. This process (instance B) runs the
CacheController in-process (A registered in its index) and pulls every chunk with
``P2PBackend.batched_get_blocking(keys)``: controller lookup, hello (first call only), acquire,
allocate, ``NixlChannel.read``, release — then checks the bytes and frees them.

Compared in the same run: the raw ``NixlChannel.read`` of the same bytes (the same descs,
one call), and a one-process ``copy_`` of the same bytes (memcpy). Median of ``--reps``. Each
rep runs the three in a rotated order (each follows each other one equally often: a call right
after the memcpy shares the cores with its spinning OpenMP threads) after a ``--gap-ms`` pause
(the pull's background lease release does not land in the next timed call). All local memory
is in the one pre-faulted buffer; the bytes are checked outside the timed call. The pull's time
is also split into its ``channel.read`` and the rest.

GPU (``--channel cuda_ipc``): both instances' tier memory is GPU memory (``allocator=gpu``:
GPUMemoryAllocator, registered as the CudaIpcChannel's region 0), so the pull is GPU to GPU
between the two processes; the peer's chunks hold seeded random bytes and every pulled byte is
compared; the ceilings are one-process device-to-device ``copy_`` of the same bytes, one call
and one call per chunk.

Usage: python scripts/bench_p2p.py [--chunks 8] [--chunk-mib 32] [--reps 5] [--gap-ms 50]
       [--per-rep] [--channel nixl|cuda_ipc]
GPU:   python scripts/bench_p2p.py --channel cuda_ipc --chunks 64 --reps 7   (16k tokens, 2 GiB)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time

MiB = 1 << 20


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pattern(i: int, n: int):
    """Chunk i's bytes on the GPU (seeded: both processes make the same)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(1000 + i)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=g)


def _setup(name: str, chunks: int, chunk_mib: int, reply_port: int, kind: str = "nixl"):
    import torch

    from lmcache.memory.cpu import CPUMemoryAllocator
    from lmcache.metadata import LMCacheMetadata
    from lmcache.storage.backends.local_cpu import LocalCPUBackend
    from lmcache.storage.backends.p2p import P2PBackend
    from lmcache.storage.policy.lru import LRUCachePolicy
    if kind != "cuda_ipc":
        from lmcache.transfer.nixl import NixlChannel

    tokens = chunk_mib * MiB // (2 * 32 * 1024 * 2)
    md = LMCacheMetadata("bench/8b-shaped", 1, 0, torch.bfloat16, (32, 2, tokens, 8, 128))
    size = (2 * chunks + 2) * chunk_mib * MiB + (64 << 20)  # pulled + raw-read objects
    if kind == "cuda_ipc":  # the tier memory on the GPU (allocator=gpu transfer_channel=cuda_ipc)
        from lmcache.memory.gpu import GPUMemoryAllocator
        from lmcache.transfer.cuda_ipc import CudaIpcChannel

        alloc = GPUMemoryAllocator(size)
        channel_cls = CudaIpcChannel
    else:
        alloc = CPUMemoryAllocator(size, pin_memory=False)
        channel_cls = NixlChannel
    alloc.buffer.fill_(0)  # touch every page
    cpu = LocalCPUBackend(alloc, LRUCachePolicy(), max_local_cpu_size=size / (1 << 30))
    channel = channel_cls(name, [alloc.buffer], timeout_s=60.0)
    p2p = P2PBackend(cpu, md, channel, lmcache_instance_id=name,
                     controller_reply_url=f"127.0.0.1:{reply_port}", p2p_host="127.0.0.1",
                     p2p_init_ports=[0], p2p_lookup_ports=[0], blocking_timeout_secs=60.0,
                     lookup_timeout_secs=10.0, lookup_cache_secs=0.0)
    return md, alloc, cpu, channel, p2p, tokens


def _keys(md, chunks: int):
    import torch

    from lmcache.keys import CacheEngineKey

    return [CacheEngineKey(md.model_name, 1, 0, 0x1000 + i, torch.bfloat16) for i in range(chunks)]


def _peer(conn, chunks: int, chunk_mib: int, reply_port: int, kind: str = "nixl") -> None:
    import torch

    from lmcache.memory.memory_format import MemoryFormat

    md, alloc, cpu, channel, p2p, tokens = _setup("bench-A", chunks, chunk_mib, reply_port, kind)
    for i, key in enumerate(_keys(md, chunks)):
        obj = cpu.allocate((2, 32, tokens, 1024), torch.bfloat16, MemoryFormat.KV_2LTD)
        if kind == "cuda_ipc":
            obj.tensor.view(torch.uint8).view(-1).copy_(_pattern(i, obj.nbytes))
        else:
            obj.tensor.view(torch.uint8).fill_(i + 1)
        cpu.put(key, obj)
        obj.ref_count_down()
    if kind == "cuda_ipc":
        torch.cuda.synchronize()
    conn.send(p2p.peer_init_url)
    conn.recv()  # done
    p2p.close()
    channel.close()
    cpu.close()
    alloc.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--chunk-mib", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--gap-ms", type=float, default=50.0,
                   help="pause before each timed call, ms")
    p.add_argument("--per-rep", action="store_true", help="also print every rep's ms")
    p.add_argument("--channel", choices=["nixl", "cuda_ipc"], default="nixl",
                   help="nixl: host memory; cuda_ipc: GPU memory of two processes on one GPU")
    a = p.parse_args()
    gpu = a.channel == "cuda_ipc"

    import torch

    from lmcache.controller.cache_controller import CacheController
    from lmcache.controller.chunk_index import WorkerInfo
    from lmcache.controller.index.memory import MemoryChunkIndex
    from lmcache.controller.protocol import ADMIT
    from lmcache.token_database.chunked import ChunkedTokenDatabase

    ctl = CacheController(MemoryChunkIndex(), ChunkedTokenDatabase(None, chunk_size=256),
                          controller_host="127.0.0.1",
                          controller_monitor_ports={"pull": 0, "reply": 0})
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    peer = ctx.Process(target=_peer, args=(child, a.chunks, a.chunk_mib, ctl.reply_port,
                                           a.channel), daemon=True)  # (never outlives a failed run)
    peer.start()
    url = parent.recv()
    md, alloc, cpu, channel, p2p, tokens = _setup("bench-B", a.chunks, a.chunk_mib,
                                                  ctl.reply_port, a.channel)
    keys = _keys(md, a.chunks)
    ctl.index.register(WorkerInfo("bench-A", 0, "127.0.0.1", 1, peer_init_url=url,
                                  last_heartbeat_time=time.time(), tiers=["LocalCPUBackend"]))
    ctl.index.apply("bench-A", 0, "LocalCPUBackend", [(ADMIT, k.chunk_hash) for k in keys])
    nbytes = a.chunks * a.chunk_mib * MiB

    want = [_pattern(i, nbytes // a.chunks) for i in range(a.chunks)] if gpu else None

    def check(objs) -> None:
        assert all(o is not None for o in objs), "a chunk was not pulled"
        for i, o in enumerate(objs):
            v = o.tensor.view(torch.uint8).view(-1)
            if gpu:  # every byte
                assert v.device.type == "cuda" and torch.equal(v, want[i]), f"chunk {i} differs"
            else:
                assert int(v[0]) == int(v[-1]) == i + 1, "wrong bytes"
            o.ref_count_down()

    # the raw channel read of the same bytes: acquire once, read the same descs repeatedly
    check(p2p.batched_get_blocking(keys))  # warm-up (hello, peer metadata)
    agent, lookup_url = p2p.client.peer(url)
    acq = p2p.client.request(lookup_url, p2p.client.acquire_message(keys), 30)
    remote = [(int(c[0]), int(c[1])) for c in acq["chunks"]]
    local_objs = [cpu.allocate((2, 32, tokens, 1024), torch.bfloat16) for _ in keys]
    base = alloc.buffer.data_ptr()
    local = [(o.tensor.data_ptr() - base, o.nbytes) for o in local_objs]
    dev = "cuda" if gpu else "cpu"
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(3)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(0)
    got: list = []
    in_read: list[float] = []  # time the pulls spent inside channel.read
    raw_read = channel.read

    def timed_read(*args, **kw):
        t0 = time.perf_counter()
        try:
            return raw_read(*args, **kw)
        finally:
            in_read.append(time.perf_counter() - t0)

    paths = {"p2p": lambda: got.append(p2p.batched_get_blocking(keys)),
             "raw": lambda: raw_read(agent, local, remote),
             "memcpy": lambda: dst.copy_(src)}
    if gpu:  # device-to-device ceilings, waited for (the channel waits for its own copy)
        step = nbytes // a.chunks

        def per_chunk() -> None:
            for o in range(0, nbytes, step):
                dst[o:o + step].copy_(src[o:o + step])
            torch.cuda.synchronize()
        paths["memcpy"] = lambda: (dst.copy_(src), torch.cuda.synchronize())
        paths["per_chunk"] = per_chunk
        torch.cuda.synchronize()
    t: dict[str, list[float]] = {k: [] for k in paths}
    channel.read = timed_read  # (the tier's reads only: the raw path calls raw_read)
    order = list(paths)
    for rep in range(a.reps):  # round robin, rotated: each path follows each other one
        for k in order[rep % len(order):] + order[:rep % len(order)]:
            time.sleep(a.gap_ms / 1000)  # the last call's background work (a release) settles
            t0 = time.perf_counter()
            paths[k]()
            t[k].append(time.perf_counter() - t0)
            if got:
                check(got.pop())  # (bytes checked outside the timed call)
    p2p.client.request(lookup_url, {"op": "release", "lease": acq["lease"]}, 30)
    for o in local_objs:
        o.ref_count_down()
    if a.per_rep:
        print({k: [round(x * 1e3, 1) for x in v] for k, v in t.items()})
    rest = [p - r for p, r in zip(t["p2p"], in_read)]
    gbs = {k: nbytes / statistics.median(v) / 1e9 for k, v in t.items()}
    print(f"\nP2P pull of {a.chunks} x {a.chunk_mib} MiB ({nbytes / MiB:.0f} MiB per call), "
          f"median of {a.reps}")
    ceiling = max(gbs["memcpy"], gbs.get("per_chunk", 0.0))
    print(f"{'path':58} {'ms':>7} {'GB/s':>7} {'x raw read':>10} {'x ceiling':>9}")
    rows = [("P2PBackend.batched_get_blocking (lookup+acquire+alloc+read+release)", "p2p"),
            (f"{type(channel).__name__}.read, same descs, one call (raw channel)", "raw"),
            ("ceiling: copy_ of the same bytes, one process (memcpy)", "memcpy")]
    if gpu:
        rows[2:] = [("ceiling: D2D copy_ of the same bytes, one call, one process", "memcpy"),
                    ("ceiling: D2D copy_, one call per chunk, one process", "per_chunk")]
    for label, k in rows:
        print(f"{label[:58]:58} {statistics.median(t[k]) * 1e3:7.2f} {gbs[k]:7.2f} "
              f"{gbs[k] / gbs['raw']:10.2f} {gbs[k] / ceiling:9.2f}")
    print(f"the tier's pull, median ms: {statistics.median(t['p2p']) * 1e3:.1f} of which "
          f"channel.read {statistics.median(in_read) * 1e3:.1f}, the rest (lookup, acquire, "
          f"allocation, release hand-off) {statistics.median(rest) * 1e3:.2f}")
    parent.send("done")
    peer.join(60)
    p2p.close()
    channel.close()
    cpu.close()
    alloc.close()
    ctl.close()


if __name__ == "__main__":
    main()
