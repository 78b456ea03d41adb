#!/usr/bin/env python3
"""Tensor-parallel benchmark on one host: N workers store and retrieve at the same time.

Spawns ``--workers`` processes (torch.multiprocessing, spawn). Worker ``i`` is TP rank ``i`` of
``world_size = N``: it uses GPU ``i % torch.cuda.device_count()`` (fewer GPUs than workers:
workers share a GPU, and the output says so) and holds its shard of a Llama-3-8B-shaped paged
KV cache (32 layers, 8 KV heads in all so 8/N per rank, head size 128, bf16, block size 16,
flash_packed layout, source and destination blocks disjoint and scattered at random). Each
worker builds lmcache's engine as ``scripts/bench_gpu.py`` does (LMCacheEngine, chunk 256,
ChunkedTokenDatabase, LocalCPUBackend over a pinned CPUMemoryAllocator,
VLLMPagedMemGPUConnectorV2 with transfer="dma") with ``LMCacheMetadata(world_size=N,
worker_id=i)``. All workers pass a multiprocessing Barrier before every timed repetition, so
per prompt length they measure, concurrently:

  ceiling    a pinned ``copy_`` of this rank's KV bytes, device->host and host->device
  store      engine.store of the prompt's KV (the engine cleared, untimed, before each rep)
  retrieve   engine.retrieve of the same prompt into the disjoint destination slots

and check that the KV retrieved into the destination slots equals, byte for byte, the KV
stored from the source slots. Times are medians of ``--reps`` repetitions after a warm-up;
per worker GB/s = its KV bytes / its time, and the fraction is against its own ceiling measured
concurrently in the same direction (store: D2H, retrieve: H2D). Aggregate GB/s = all workers'
bytes / the slowest worker's time in each repetition (median over repetitions).

``--device cpu`` runs the same plumbing on CPU tensors (the connector's torch path, an
unpinned allocator; the "ceiling" is a host memcpy) to check the script without a GPU.

Usage: PYTHONPATH=src python scripts/bench_tp.py [--workers 2] [--tokens 8192 16384]
       [--reps 3] [--device cuda|cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
import traceback

import torch
import torch.multiprocessing as mp

L, H_TOTAL, D, N, CHUNK, DTYPE = 32, 8, 128, 16, 256, torch.bfloat16


def bytes_per_token(heads: int) -> int:
    return 2 * L * heads * D * 2  # K and V, all layers, bf16


class Worker:
    """One TP rank: its KV shard, allocator and engine."""

    def __init__(self, rank: int, world: int, device: str, max_tokens: int, barrier) -> None:
        from lmcache.engine.lmcache_engine import LMCacheEngine
        from lmcache.gpu_connector.kv_layout import KVCacheLayout
        from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
        from lmcache.memory.cpu import CPUMemoryAllocator
        from lmcache.metadata import LMCacheMetadata
        from lmcache.storage.backends.local_cpu import LocalCPUBackend
        from lmcache.storage.manager import StorageManager
        from lmcache.storage.policy.lru import LRUCachePolicy
        from lmcache.token_database.chunked import ChunkedTokenDatabase

        self.rank, self.world, self.barrier = rank, world, barrier
        self.heads = H_TOTAL // world
        self.bpt = bytes_per_token(self.heads)
        self.cuda = device == "cuda"
        if self.cuda:
            self.gpu = rank % torch.cuda.device_count()
            torch.cuda.set_device(self.gpu)
            try:
                import cupy

                cupy.cuda.Device(self.gpu).use()
            except ImportError:
                pass
            self.dev = torch.device("cuda", self.gpu)
        else:
            self.gpu, self.dev = None, torch.device("cpu")
        self.meta = LMCacheMetadata("bench/llama-3-8b", world, rank, DTYPE,
                                    (L, 2, CHUNK, self.heads, D))
        self.layout = KVCacheLayout("flash_packed", N, self.heads, D)
        half = -(-max_tokens // N) + 64  # blocks for the sources, the same for the destinations
        self.num_blocks = 2 * half + 1  # block 0 left out (vLLM's null block)
        gen = torch.Generator(device=self.dev).manual_seed(1000 + rank)
        self.kv = [torch.randn(self.num_blocks, self.heads, N, 2 * D, generator=gen,
                               device=self.dev, dtype=DTYPE) for _ in range(L)]
        perm = torch.randperm(self.num_blocks - 1, generator=torch.Generator().manual_seed(rank)) + 1
        self.src_blocks, self.dst_blocks = perm[:half], perm[half:2 * half]
        self.alloc = CPUMemoryAllocator(max_tokens * self.bpt + (64 << 20),
                                        pin_memory=True if self.cuda else False)
        if self.cuda:
            assert self.alloc.pinned, "CPU allocator is not pinned"
        backend = LocalCPUBackend(self.alloc, LRUCachePolicy(),
                                  max_local_cpu_size=self.alloc.capacity_bytes / 2**30)
        conn = VLLMPagedMemGPUConnectorV2(self.meta, self.layout,
                                          backend="cupy" if self.cuda else "torch",
                                          transfer="dma")
        self.engine = LMCacheEngine(self.meta, ChunkedTokenDatabase(self.meta, CHUNK), conn,
                                    StorageManager([backend]))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def slots(self, blocks: torch.Tensor, tokens: int) -> torch.Tensor:
        s = (blocks[: -(-tokens // N)][:, None] * N + torch.arange(N)).flatten()[:tokens]
        return s.to(self.dev)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """KV of ``slots``: [L, tokens, heads, 2*D], a copy."""
        return torch.stack([k[slots // N, :, slots % N, :] for k in self.kv])

    def together(self, fn, reps: int) -> list[float]:
        """Warm-up, then ``reps`` times: barrier, ``fn`` timed (device synchronized)."""
        fn()
        self.sync()
        times = []
        for _ in range(reps):
            self.sync()
            self.barrier.wait()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return times

    def ceiling(self, tokens: int, reps: int) -> tuple[list[float], list[float]]:
        nbytes = tokens * self.bpt
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        host.random_(0, 256)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self.dev)
        d2h = self.together(lambda: host.copy_(dev, non_blocking=self.cuda), reps)
        h2d = self.together(lambda: dev.copy_(host, non_blocking=self.cuda), reps)
        return d2h, h2d

    def engine_run(self, tokens: int, reps: int) -> tuple[list[float], list[float], bool]:
        ids = torch.randint(0, 128000, (tokens,), generator=torch.Generator().manual_seed(tokens))
        src, dst = self.slots(self.src_blocks, tokens), self.slots(self.dst_blocks, tokens)
        engine = self.engine

        def store_once() -> float:
            engine.clear()
            self.sync()
            self.barrier.wait()
            t0 = time.perf_counter()
            stored = engine.store(ids, kvcaches=self.kv, slot_mapping=src)
            self.sync()
            dt = time.perf_counter() - t0
            assert stored == tokens, f"rank {self.rank}: stored {stored} of {tokens} tokens"
            return dt

        def retrieve() -> None:
            mask = engine.retrieve(ids, kvcaches=self.kv, slot_mapping=dst)
            got = int(mask.sum())
            assert got == tokens, f"rank {self.rank}: retrieved {got} of {tokens} tokens"

        store_once()  # warm-up
        st = [store_once() for _ in range(reps)]
        for k in self.kv:  # destination zeroed so the check below sees only retrieved bytes
            k[self.dst_blocks] = 0
        rt = self.together(retrieve, reps)
        ok = torch.equal(self.gather(src).view(torch.int16), self.gather(dst).view(torch.int16))
        engine.clear()
        return st, rt, ok


def worker_main(rank: int, world: int, args, barrier, queue) -> None:
    try:
        w = Worker(rank, world, args.device, max(args.tokens), barrier)
        rows = []
        for tokens in args.tokens:
            d2h, h2d = w.ceiling(tokens, args.reps)
            st, rt, ok = w.engine_run(tokens, args.reps)
            rows.append({"tokens": tokens, "bytes": tokens * w.bpt, "ceil_d2h_s": d2h,
                         "ceil_h2d_s": h2d, "store_s": st, "retrieve_s": rt, "bytes_equal": ok})
            med, b = statistics.median, tokens * w.bpt / 1e9
            print(f"worker {rank} tokens {tokens}: ceil D2H {b / med(d2h):.1f} H2D "
                  f"{b / med(h2d):.1f} store {b / med(st):.1f} retrieve {b / med(rt):.1f} GB/s, "
                  f"bytes equal {ok}", flush=True)
        info = {"rank": rank, "gpu": w.gpu, "heads": w.heads, "pinned": w.alloc.pinned}
        if w.cuda:
            info["gpu_name"] = torch.cuda.get_device_name(w.gpu)
        w.engine.close()
        queue.put({"rank": rank, "info": info, "rows": rows})
    except BaseException as err:  # noqa: BLE001 - reported to the parent, peers released
        barrier.abort()
        queue.put({"rank": rank, "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()})


def summarize(results: list[dict], args) -> dict:
    """Per worker and aggregate GB/s with fractions of the concurrent ceilings."""
    med = statistics.median
    table = []
    for i, tokens in enumerate(args.tokens):
        rows = [r["rows"][i] for r in results]
        entry = {"tokens": tokens, "workers": []}
        for r, row in zip(results, rows):
            b = row["bytes"]
            cd, ch = b / med(row["ceil_d2h_s"]), b / med(row["ceil_h2d_s"])
            st, rt = b / med(row["store_s"]), b / med(row["retrieve_s"])
            entry["workers"].append({
                "rank": r["rank"], "gpu": r["info"]["gpu"], "bytes": b, "ceil_d2h_Bps": cd,
                "ceil_h2d_Bps": ch, "store_Bps": st, "retrieve_Bps": rt,
                "store_frac": st / cd, "retrieve_frac": rt / ch,
                "bytes_equal": row["bytes_equal"]})
        total = sum(row["bytes"] for row in rows)

        def agg(key: str) -> float:  # all bytes / slowest worker's time, per rep, median
            return total / med(max(ts) for ts in zip(*(row[key] for row in rows)))

        entry["aggregate"] = {k.replace("_s", "_Bps"): agg(k) for k in
                              ("ceil_d2h_s", "ceil_h2d_s", "store_s", "retrieve_s")}
        a = entry["aggregate"]
        a["store_frac"] = a["store_Bps"] / a["ceil_d2h_Bps"]
        a["retrieve_frac"] = a["retrieve_Bps"] / a["ceil_h2d_Bps"]
        table.append(entry)
    return {"sizes": table}


def print_table(summary: dict, args, shared: bool) -> None:
    print(f"\nTP={args.workers} on one host, device={args.device}"
          + (" (workers SHARE one GPU: each ceiling is measured while the others copy too)"
             if shared else ""))
    print("GB/s (median of %d reps, barrier before each); () = fraction of the worker's own "
          "ceiling measured concurrently in the same direction (store: D2H, retrieve: H2D)"
          % args.reps)
    print("| tokens | worker | GPU | MiB | ceil D2H | ceil H2D | store | retrieve | bytes equal |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for e in summary["sizes"]:
        for w in e["workers"]:
            print(f"| {e['tokens']} | {w['rank']} | {w['gpu'] if w['gpu'] is not None else 'cpu'}"
                  f" | {w['bytes'] / 2**20:.0f} | {w['ceil_d2h_Bps'] / 1e9:.1f} | "
                  f"{w['ceil_h2d_Bps'] / 1e9:.1f} | {w['store_Bps'] / 1e9:.1f} "
                  f"({w['store_frac']:.0%}) | {w['retrieve_Bps'] / 1e9:.1f} "
                  f"({w['retrieve_frac']:.0%}) | {'yes' if w['bytes_equal'] else 'NO'} |")
        a = e["aggregate"]
        mib = sum(w["bytes"] for w in e["workers"]) / 2**20
        print(f"| {e['tokens']} | all | - | {mib:.0f} | {a['ceil_d2h_Bps'] / 1e9:.1f} | "
              f"{a['ceil_h2d_Bps'] / 1e9:.1f} | {a['store_Bps'] / 1e9:.1f} "
              f"({a['store_frac']:.0%}) | {a['retrieve_Bps'] / 1e9:.1f} "
              f"({a['retrieve_frac']:.0%}) | "
              f"{'yes' if all(w['bytes_equal'] for w in e['workers']) else 'NO'} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds to wait for the workers (and for each barrier)")
    ap.add_argument("--json", help="write all numbers to this file")
    args = ap.parse_args()
    # timeout(1) sends SIGTERM: exit normally so multiprocessing ends the daemon workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.workers < 1 or H_TOTAL % args.workers:
        ap.error(f"--workers must divide the {H_TOTAL} KV heads, got {args.workers}")
    if any(t < CHUNK or t % CHUNK for t in args.tokens):
        ap.error(f"--tokens must be positive multiples of the chunk size {CHUNK}, "
                 f"got {args.tokens}")
    gpus = 0
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda needs a CUDA device (use --device cpu to check the plumbing)")
        gpus = torch.cuda.device_count()
    shared = args.device == "cuda" and gpus < args.workers
    print(json.dumps({"workers": args.workers, "device": args.device, "gpus": gpus,
                      "shared_gpu": shared, "tokens": args.tokens, "reps": args.reps,
                      "torch": torch.__version__, "cpus": os.cpu_count()}), flush=True)
    if shared:
        print(f"NOTE: {gpus} GPU(s) for {args.workers} workers: worker i uses GPU i % {gpus}, "
              "so workers share a GPU and its PCIe link", flush=True)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.workers, timeout=args.timeout)
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=worker_main, args=(i, args.workers, args, barrier, queue),
                         daemon=True) for i in range(args.workers)]
    for p in procs:
        p.start()
    results, deadline = [], time.monotonic() + args.timeout
    done = threading.Event()

    def collect() -> None:
        for _ in procs:
            results.append(queue.get())
        done.set()

    threading.Thread(target=collect, daemon=True).start()
    while not done.wait(1.0):
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            why = f"worker exit codes {[p.exitcode for p in procs]}" if dead else "timeout"
            print(f"FAILED: {why}", flush=True)
            for p in procs:
                if p.is_alive():
                    p.kill()
            return 1
    for p in procs:
        p.join(10)
    errors = [r for r in results if "error" in r]
    for r in sorted(errors, key=lambda r: r["rank"]):
        print(f"worker {r['rank']} failed: {r['error']}\n{r['traceback']}", flush=True)
    if errors:
        return 1
    results.sort(key=lambda r: r["rank"])
    for r in results:
        print(json.dumps(r["info"]), flush=True)
    summary = summarize(results, args)
    print_table(summary, args, shared)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "gpus": gpus, "shared_gpu": shared,
                       "workers": [r["info"] for r in results], "raw": results, **summary},
                      f, indent=1)
    ok = all(w["bytes_equal"] for e in summary["sizes"] for w in e["workers"])
    if not ok:
        print("FAILED: retrieved KV differs from stored KV", flush=True)
    return 0 if ok else 2


if __name__ == "__main__":
    raise SystemExit(main())
