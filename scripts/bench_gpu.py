#!/usr/bin/env python3
"""GPU data-path benchmark: lmcache store/retrieve vs the pinned ``copy_`` ceiling, and prefill.

Llama-3-8B-shaped paged KV cache (32 layers, 8 KV heads, head size 128, bf16, block size 16,
flash_packed layout, blocks scattered at random; block 0 left out as vLLM's null block). For
each prompt length it measures, in the same process:

  ceiling    one pinned ``copy_`` of the same bytes (host->device and device->host)
  engine     LMCacheEngine.store / .retrieve (chunk 256, LocalCPUBackend over a pinned
             CPUMemoryAllocator, VLLMPagedMemGPUConnectorV2Cupy): hashing, allocation, tiers
             and the kernel, wall clock, host-synchronous as the engine returns
  connector  VLLMPagedMemGPUConnectorV2Cupy.batched_from_gpu / batched_to_gpu alone (one launch
             over every chunk, pinned MemoryObjs read/written through mapped pointers)
  staged     for comparison: DMA copy_ of the same MemoryObjs to a device buffer, then the same
             kernel from device memory
  torch      the torch reference connector (VLLMPagedMemGPUConnectorV2) on the same data
  layerwise  VLLMPagedMemLayerwiseGPUConnector, all layers back to back (no compute overlap)

and, with --prefill, the prefill time of a Llama-3-8B-shaped LlamaForCausalLM (transformers,
random bf16 weights, sdpa) over a --prefill-tokens prompt against the engine's retrieve of the
same number of tokens. Every time is the median of --reps runs after one warm-up; throughput is
KV bytes / time and is reported as a fraction of the ceiling in the same direction.

Usage: PYTHONPATH=src python scripts/bench_gpu.py [--tokens 1024 8192 32768] [--reps 5]
       [--prefill --prefill-tokens 16384] [--sweep] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from lmcache.gpu_connector import cupy_kernels
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.vllm_layerwise import VLLMPagedMemLayerwiseGPUConnector
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.gpu_connector.vllm_paged_cupy import VLLMPagedMemGPUConnectorV2Cupy
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata

L, H, D, N, CHUNK, DTYPE = 32, 8, 128, 16, 256, torch.bfloat16
BYTES_PER_TOKEN = 2 * L * H * D * 2  # K and V, all layers, bf16: 128 KiB


def timed(fn, reps: int) -> float:
    """Median wall seconds of ``fn`` (device synchronized around each call), after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    info = {
        "gpu": props.name, "sms": props.multi_processor_count,
        "gpu_mem_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except ImportError:
        pass
    query = "driver_version,pcie.link.gen.current,pcie.link.width.current,pcie.link.gen.max"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        info["nvidia_smi"] = out
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia_smi"] = f"unavailable: {err}"
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


class Setup:
    """Paged KV cache, slot mappings and allocator shared by every measurement."""

    def __init__(self, max_tokens: int) -> None:
        self.meta = LMCacheMetadata("bench/llama-3-8b", 1, 0, DTYPE, (L, 2, CHUNK, H, D))
        self.layout = KVCacheLayout("flash_packed", N, H, D)
        self.num_blocks = max_tokens // N + 256
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.kv = [torch.randn(self.num_blocks, H, N, 2 * D, generator=gen, device="cuda",
                               dtype=DTYPE) for _ in range(L)]
        self.max_tokens = max_tokens
        reserve = max_tokens * BYTES_PER_TOKEN + (64 << 20)
        self.alloc = CPUMemoryAllocator(reserve)
        assert self.alloc.pinned, "CPU allocator is not pinned"

    def slots(self, tokens: int, seed: int) -> torch.Tensor:
        """Slots of ``tokens`` tokens in blocks scattered at random (block 0 never used)."""
        gen = torch.Generator().manual_seed(seed)
        blocks = torch.randperm(self.num_blocks - 1, generator=gen)[: -(-tokens // N)] + 1
        return (blocks[:, None] * N + torch.arange(N)).flatten()[:tokens].cuda()


def ceiling(tokens: int, reps: int) -> tuple[float, float]:
    nbytes = tokens * BYTES_PER_TOKEN
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.random_(0, 256)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = timed(lambda: dev.copy_(host, non_blocking=True), reps)
    d2h = timed(lambda: host.copy_(dev, non_blocking=True), reps)
    del host, dev
    return nbytes / h2d, nbytes / d2h


def chunks(tokens: int) -> tuple[list[int], list[int]]:
    starts = list(range(0, tokens, CHUNK))
    return starts, [min(s + CHUNK, tokens) for s in starts]


def bench_connector(s: Setup, conn, tokens: int, reps: int) -> tuple[float, float]:
    starts, ends = chunks(tokens)
    objs = [s.alloc.allocate(conn.get_shape(e - b), DTYPE, conn.fmt) for b, e in zip(starts, ends)]
    src, dst = s.slots(tokens, 1), s.slots(tokens, 2)
    store = timed(lambda: conn.batched_from_gpu(objs, starts, ends, kvcaches=s.kv,
                                                slot_mapping=src), reps)
    load = timed(lambda: conn.batched_to_gpu(objs, starts, ends, kvcaches=s.kv,
                                             slot_mapping=dst), reps)
    for o in objs:
        o.ref_count_down()
    nbytes = tokens * BYTES_PER_TOKEN
    return nbytes / store, nbytes / load


def bench_staged(s: Setup, tokens: int, reps: int) -> tuple[float, float]:
    """DMA between the pinned MemoryObjs and a device buffer + the kernel on device memory."""
    conn = VLLMPagedMemGPUConnectorV2Cupy(s.meta, s.layout, backend="cupy")
    starts, ends = chunks(tokens)
    objs = [s.alloc.allocate(conn.get_shape(e - b), DTYPE, conn.fmt) for b, e in zip(starts, ends)]
    stage = [torch.empty_like(o.tensor, device="cuda") for o in objs]
    src, dst = s.slots(tokens, 1), s.slots(tokens, 2)

    def store():
        cupy_kernels.launch_transfer(s.kv, s.layout, stage, src, starts, to_paged=False,
                                     single_layer=False).wait()
        for o, d in zip(objs, stage):
            o.tensor.copy_(d, non_blocking=True)

    def load():
        for o, d in zip(objs, stage):
            d.copy_(o.tensor, non_blocking=True)
        cupy_kernels.launch_transfer(s.kv, s.layout, stage, dst, starts, to_paged=True,
                                     single_layer=False).wait()

    st, ld = timed(store, reps), timed(load, reps)
    for o in objs:
        o.ref_count_down()
    nbytes = tokens * BYTES_PER_TOKEN
    return nbytes / st, nbytes / ld


def bench_layerwise(s: Setup, tokens: int, reps: int) -> tuple[float, float]:
    conn = VLLMPagedMemLayerwiseGPUConnector(s.meta, s.layout, backend="cupy")
    starts, ends = chunks(tokens)
    objs = [[s.alloc.allocate(conn.get_shape(e - b), DTYPE, MemoryFormat.KV_T2D)
             for b, e in zip(starts, ends)] for _ in range(L)]
    src, dst = s.slots(tokens, 1), s.slots(tokens, 2)

    def store():
        for _ in conn.batched_from_gpu(objs, starts, ends, kvcaches=s.kv, slot_mapping=src):
            pass

    def load():
        gen = conn.batched_to_gpu(None, starts, ends, kvcaches=s.kv, slot_mapping=dst)
        next(gen)
        for layer in range(L):
            gen.send(objs[layer]).wait_on()
        next(gen, None)

    st, ld = timed(store, reps), timed(load, reps)
    for row in objs:
        for o in row:
            o.ref_count_down()
    nbytes = tokens * BYTES_PER_TOKEN
    return nbytes / st, nbytes / ld


def make_engine(s: Setup):
    from lmcache.engine.lmcache_engine import LMCacheEngine
    from lmcache.storage.backends.local_cpu import LocalCPUBackend
    from lmcache.storage.manager import StorageManager
    from lmcache.storage.policy.lru import LRUCachePolicy
    from lmcache.token_database.chunked import ChunkedTokenDatabase

    backend = LocalCPUBackend(s.alloc, LRUCachePolicy(), max_local_cpu_size=s.alloc.capacity_bytes / 2**30)
    conn = VLLMPagedMemGPUConnectorV2Cupy(s.meta, s.layout, backend="cupy")
    return LMCacheEngine(s.meta, ChunkedTokenDatabase(s.meta, CHUNK), conn, StorageManager([backend]))


def bench_engine(s: Setup, engine, tokens: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, 128000, (tokens,), generator=gen)
    src, dst = s.slots(tokens, 1), s.slots(tokens, 2)

    def store() -> float:
        engine.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stored = engine.store(ids, kvcaches=s.kv, slot_mapping=src)
        torch.cuda.synchronize()
        assert stored == tokens, (stored, tokens)
        return time.perf_counter() - t0

    def retrieve():
        mask = engine.retrieve(ids, kvcaches=s.kv, slot_mapping=dst)
        assert int(mask.sum()) == tokens

    store()  # warm-up
    st = statistics.median(store() for _ in range(reps))  # the clear() before each is untimed
    rt = timed(retrieve, reps)
    t0 = time.perf_counter()
    list(engine.token_database.process_tokens(ids))
    hashing = time.perf_counter() - t0
    engine.clear()
    nbytes = tokens * BYTES_PER_TOKEN
    return {"store_Bps": nbytes / st, "retrieve_Bps": nbytes / rt, "store_s": st,
            "retrieve_s": rt, "hash_s": hashing}


def bench_prefill(tokens: int, reps: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=L,
        num_attention_heads=32, num_key_value_heads=H, max_position_embeddings=max(8192, tokens),
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to(torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    ids = torch.randint(0, 128000, (1, tokens), device="cuda")

    def prefill():
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        assert out.logits.shape[1] == 1

    t = timed(prefill, reps)
    del model
    torch.cuda.empty_cache()
    return t


def sweep(s: Setup, reps: int) -> list[dict]:
    """Launch-shape variants of the connector path at 8k tokens (direct mapped access)."""
    rows = []
    base = dict(cupy_kernels.TUNING)
    conn = VLLMPagedMemGPUConnectorV2Cupy(s.meta, s.layout, backend="cupy")
    for threads, rpt, grid in [(256, 4, 1 << 16), (256, 8, 1 << 16), (256, 2, 1 << 16),
                               (128, 4, 1 << 16), (256, 4, 132 * 4), (256, 8, 132 * 2)]:
        cupy_kernels.TUNING.update(threads=threads, rows_per_thread=rpt, max_grid_x=grid)
        st, ld = bench_connector(s, conn, 8192, reps)
        rows.append({"threads": threads, "rows_per_thread": rpt, "max_grid_x": grid,
                     "store_GBps": st / 1e9, "retrieve_GBps": ld / 1e9})
        print(f"  sweep threads={threads} rows={rpt} grid_x<={grid}: store {st/1e9:.1f} GB/s, "
              f"retrieve {ld/1e9:.1f} GB/s", flush=True)
    cupy_kernels.TUNING.update(base)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 16384, 32768])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prefill", action="store_true")
    ap.add_argument("--prefill-tokens", type=int, default=16384)
    ap.add_argument("--sweep", action="store_true", help="also try launch-shape variants")
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--json", help="write all numbers to this file")
    args = ap.parse_args()
    assert torch.cuda.is_available() and cupy_kernels.cupy_available(), "needs CUDA and CuPy"
    result: dict = {"device": device_info(), "tuning": dict(cupy_kernels.TUNING), "sizes": []}
    print(json.dumps(result["device"]), flush=True)
    sizes = sorted(set(args.tokens + ([args.prefill_tokens] if args.prefill else [])))
    s = Setup(max(sizes))
    fast = VLLMPagedMemGPUConnectorV2Cupy(s.meta, s.layout, backend="cupy")
    slow = VLLMPagedMemGPUConnectorV2(s.meta, s.layout)
    engine = None
    if not args.no_engine:
        try:
            engine = make_engine(s)
        except Exception as err:  # report, and measure through the connector only
            print(f"engine unavailable ({type(err).__name__}: {err}); connector only", flush=True)
            result["engine_error"] = repr(err)
    if args.sweep:
        result["sweep"] = sweep(s, args.reps)
    for tokens in sizes:
        row = {"tokens": tokens, "bytes": tokens * BYTES_PER_TOKEN}
        row["ceil_h2d"], row["ceil_d2h"] = ceiling(tokens, args.reps)
        row["conn_store"], row["conn_retrieve"] = bench_connector(s, fast, tokens, args.reps)
        row["staged_store"], row["staged_retrieve"] = bench_staged(s, tokens, args.reps)
        row["torch_store"], row["torch_retrieve"] = bench_connector(s, slow, tokens, max(1, args.reps // 2))
        if tokens <= 8192:
            row["lw_store"], row["lw_retrieve"] = bench_layerwise(s, tokens, args.reps)
        if engine is not None:
            row["engine"] = bench_engine(s, engine, tokens, args.reps)
        result["sizes"].append(row)
        print(json.dumps(row), flush=True)
    if args.prefill:
        result["prefill_s"] = bench_prefill(args.prefill_tokens, max(2, args.reps // 2))
    print_table(result, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def print_table(result: dict, args) -> None:
    def gbs(x):
        return f"{x / 1e9:6.1f}"

    print("\nGB/s (fraction of the pinned copy_ ceiling in the same direction)")
    print(f"{'tokens':>7} {'MiB':>6} | {'ceil D2H':>8} {'ceil H2D':>8} | {'engine store':>15} "
          f"{'engine retr.':>15} | {'conn store':>15} {'conn retr.':>15} | {'staged st/rt':>13} "
          f"| {'torch st/rt':>11} | {'layerwise st/rt':>15}")
    for r in result["sizes"]:
        e = r.get("engine")
        eng = (f"{gbs(e['store_Bps'])} ({e['store_Bps'] / r['ceil_d2h']:4.0%}) "
               f"{gbs(e['retrieve_Bps'])} ({e['retrieve_Bps'] / r['ceil_h2d']:4.0%})") if e else \
            f"{'n/a':>15} {'n/a':>15}"
        lw = f"{gbs(r['lw_store'])}/{gbs(r['lw_retrieve'])}" if "lw_store" in r else "-"
        print(f"{r['tokens']:>7} {r['bytes'] / 2**20:6.0f} | {gbs(r['ceil_d2h']):>8} "
              f"{gbs(r['ceil_h2d']):>8} | {eng} | {gbs(r['conn_store'])} "
              f"({r['conn_store'] / r['ceil_d2h']:4.0%}) {gbs(r['conn_retrieve'])} "
              f"({r['conn_retrieve'] / r['ceil_h2d']:4.0%}) | {gbs(r['staged_store'])}/"
              f"{gbs(r['staged_retrieve'])} | {gbs(r['torch_store'])}/{gbs(r['torch_retrieve'])} "
              f"| {lw:>15}")
    if "prefill_s" in result:
        pt = args.prefill_tokens
        row = next(r for r in result["sizes"] if r["tokens"] == pt)
        retr = row["engine"]["retrieve_s"] if "engine" in row else row["bytes"] / row["conn_retrieve"]
        via = "engine" if "engine" in row else "connector"
        print(f"\nprefill of {pt} tokens (Llama-3-8B shape, random bf16 weights, sdpa): "
              f"{result['prefill_s'] * 1e3:.1f} ms; lmcache retrieve of its KV ({via}): "
              f"{retr * 1e3:.1f} ms; speed-up {result['prefill_s'] / retr:.1f}x")
        result["prefill_speedup"] = result["prefill_s"] / retr


if __name__ == "__main__":
    main()
