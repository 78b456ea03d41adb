#!/usr/bin/env python3
"""GPU data-path benchmark: lmcache store/retrieve vs the pinned ``copy_`` ceiling, and prefill.

Llama-3-8B-shaped paged KV cache (32 layers, 8 KV heads, head size 128, bf16, block size 16,
flash_packed layout, blocks scattered at random; block 0 left out as vLLM's null block). For
each prompt length it measures, in the same process:

  ceiling    one pinned ``copy_`` of the same bytes (host->device and device->host)
  engine     LMCacheEngine.store / .retrieve (chunk 256, LocalCPUBackend over a pinned
             CPUMemoryAllocator, VLLMPagedMemGPUConnectorV2 with either transfer): hashing,
             allocation, tiers and the copy, wall clock, host-synchronous as the engine returns
  conn       VLLMPagedMemGPUConnectorV2.batched_from_gpu / batched_to_gpu alone, with
             transfer="dma" (copy engine through two 32 MiB staging buffers, pipelined with the
             kernel) and transfer="mapped" (one launch over every chunk, the kernel reading and
             writing the pinned MemoryObjs through their mapped pointers)
  torch      the torch reference connector (TorchPagedMemGPUConnector) on the same data
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
from lmcache.gpu_connector.paged_torch import TorchPagedMemGPUConnector
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
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

    def __init__(self, max_tokens: int, spare_blocks: int = 256) -> None:
        self.meta = LMCacheMetadata("bench/llama-3-8b", 1, 0, DTYPE, (L, 2, CHUNK, H, D))
        self.layout = KVCacheLayout("flash_packed", N, H, D)
        self.num_blocks = max_tokens // N + spare_blocks
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


def make_engine(s: Setup, transfer: str, allocator=None):
    from lmcache.engine.lmcache_engine import LMCacheEngine
    from lmcache.storage.backends.local_cpu import LocalCPUBackend
    from lmcache.storage.manager import StorageManager
    from lmcache.storage.policy.lru import LRUCachePolicy
    from lmcache.token_database.chunked import ChunkedTokenDatabase

    alloc = allocator or s.alloc
    backend = LocalCPUBackend(alloc, LRUCachePolicy(), max_local_cpu_size=alloc.capacity_bytes / 2**30)
    conn = VLLMPagedMemGPUConnectorV2(s.meta, s.layout, backend="cupy", transfer=transfer)
    return LMCacheEngine(s.meta, ChunkedTokenDatabase(s.meta, CHUNK), conn, StorageManager([backend]))


def bench_engine(s: Setup, engine, tokens: int, reps: int, req_id=None) -> dict:
    """Engine store / retrieve of ``tokens`` tokens. ``req_id``: the calls carry it (the
    engine then reuses the request's chunk hashes, as after vLLM's lookup of the request);
    None: every call hashes the tokens."""
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, 128000, (tokens,), generator=gen)
    src, dst = s.slots(tokens, 1), s.slots(tokens, 2)
    kw = {} if req_id is None else {"req_id": req_id}
    if req_id is not None:
        engine.lookup(ids, lookup_id=req_id)  # the scheduler's lookup hashes the prompt

    def store() -> float:
        engine.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stored = engine.store(ids, kvcaches=s.kv, slot_mapping=src, **kw)
        torch.cuda.synchronize()
        assert stored == tokens, (stored, tokens)
        return time.perf_counter() - t0

    def retrieve():
        mask = engine.retrieve(ids, kvcaches=s.kv, slot_mapping=dst, **kw)
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


def build_model(tokens: int):
    """A Llama-3-8B-shaped LlamaForCausalLM (random bf16 weights, sdpa) on the GPU."""
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
    return model


def make_prefill(model, tokens: int):
    ids = torch.randint(0, 128000, (1, tokens), device="cuda")

    def prefill():  # enqueues the forward pass; no host sync
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        assert out.logits.shape[1] == 1

    return prefill


def bench_prefill(model, tokens: int, reps: int) -> float:
    return timed(make_prefill(model, tokens), reps)


def bench_prefill_with_store(s: Setup, model, tokens: int, steps: int, rounds: int) -> dict:
    """A loop of ``steps`` prefills of ``tokens`` tokens; before each step's forward pass the
    engine stores the previous step's KV (``tokens`` tokens of the paged cache, new token ids
    each step so every chunk is stored). Variants, interleaved ``rounds`` times: no store;
    ``engine.store(..., wait=False)`` (the copy waits for the compute stream on the GPU and the
    host goes on to launch the next forward pass); ``engine.store`` (the host waits for the
    copy). Returns the median seconds per step of each variant."""

    engine = make_engine(s, "dma", allocator=CPUMemoryAllocator(
        2 * tokens * BYTES_PER_TOKEN + (64 << 20)))
    prefill = make_prefill(model, tokens)
    src = s.slots(tokens, 1)
    gen = torch.Generator().manual_seed(7)
    stored = {"async": 0, "sync": 0}

    def loop(variant: str) -> float:
        engine.clear()
        ids = [torch.randint(0, 128000, (tokens,), generator=gen) for _ in range(steps)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            if variant != "none":  # the KV the previous step wrote into the paged cache
                kw = {"wait": False} if variant == "async" else {}
                stored[variant] += engine.store(ids[i], kvcaches=s.kv, slot_mapping=src, **kw)
            prefill()
        if hasattr(engine, "wait_for_stores"):
            engine.wait_for_stores()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    loop("none")  # warm-up
    loop("async")
    times: dict[str, list[float]] = {"none": [], "async": [], "sync": []}
    for _ in range(rounds):
        for variant in ("none", "async", "sync", "none"):
            times[variant].append(loop(variant))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["stored_tokens"] = stored
    out["steps"], out["rounds"], out["tokens"] = steps, rounds, tokens
    engine.close()
    return out


def profile_engine(s: Setup, engine, tokens: int, reps: int) -> dict:
    """Where the engine's time goes: its steps replayed through the components' public APIs
    (token database, storage manager, connector), each timed; and engine.store / retrieve
    with Python's garbage collector on and off."""
    import gc

    ids = torch.randint(0, 128000, (tokens,))
    src, dst = s.slots(tokens, 1), s.slots(tokens, 2)
    conn, sm, db = engine.gpu_connector, engine.storage_manager, engine.token_database
    steps: dict[str, list[float]] = {}

    def tick(name, t0):
        steps.setdefault(name, []).append(time.perf_counter() - t0)
        return time.perf_counter()

    for _ in range(reps):
        engine.clear()
        torch.cuda.synchronize()
        t = time.perf_counter()
        chunks = list(db.process_tokens(ids))
        t = tick("hash", t)
        hits = [sm.contains_prefix([k]) for _, _, k in chunks]
        t = tick("contains x chunks", t)
        objs = [sm.allocate(conn.get_shape(e - b), DTYPE, conn.fmt) for b, e, _ in chunks]
        t = tick("allocate x chunks", t)
        starts, ends, keys = [c[0] for c in chunks], [c[1] for c in chunks], [c[2] for c in chunks]
        conn.batched_from_gpu(objs, starts, ends, kvcaches=s.kv, slot_mapping=src)
        t = tick("connector store", t)
        sm.batched_put(keys, objs)
        t = tick("batched_put", t)
        assert not any(hits)
        db_chunks = list(db.process_tokens(ids))
        t = tick("hash (retrieve)", t)
        n = sm.contains_prefix([k for _, _, k in db_chunks])
        got = sm.batched_get(keys[:n])
        t = tick("contains_prefix + batched_get", t)
        conn.batched_to_gpu(got, starts, ends, kvcaches=s.kv, slot_mapping=dst)
        t = tick("connector retrieve", t)
        for o in got:
            o.ref_count_down()
        tick("release", t)
    out = {k: statistics.median(v) for k, v in steps.items()}
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        st, rt = [], []
        for _ in range(reps):
            engine.clear()
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.store(ids, kvcaches=s.kv, slot_mapping=src)
            st.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.retrieve(ids, kvcaches=s.kv, slot_mapping=dst)
            rt.append(time.perf_counter() - t)
        out[f"engine.store gc={'on' if enabled else 'off'}"] = statistics.median(st)
        out[f"engine.retrieve gc={'on' if enabled else 'off'}"] = statistics.median(rt)
    gc.enable()
    engine.clear()
    print(f"\nengine time breakdown, {tokens} tokens (median of {reps}, ms):")
    for k, v in out.items():
        print(f"  {k:34s} {v * 1e3:8.2f}")
    return out


def sweep(s: Setup, reps: int) -> list[dict]:
    """Variants: mapped-path launch shapes and L2 prefetch hints, dma-path staging sizes."""
    rows = []
    base = dict(cupy_kernels.TUNING)
    mapped = VLLMPagedMemGPUConnectorV2(s.meta, s.layout, backend="cupy", transfer="mapped")
    variants = [dict(threads=256, rows_per_thread=4, l2_prefetch=0),
                dict(threads=256, rows_per_thread=4, l2_prefetch=128),
                dict(threads=256, rows_per_thread=4, l2_prefetch=256),
                dict(threads=256, rows_per_thread=8, l2_prefetch=256),
                dict(threads=128, rows_per_thread=2, l2_prefetch=0)]
    for tokens in (8192, 32768):
        for v in variants:
            cupy_kernels.TUNING.update(v)
            st, ld = bench_connector(s, mapped, tokens, reps)
            rows.append({"path": "mapped", "tokens": tokens, **v, "store_GBps": st / 1e9,
                         "retrieve_GBps": ld / 1e9})
            print(f"  sweep mapped {tokens} {v}: store {st/1e9:.1f} GB/s, retrieve {ld/1e9:.1f}",
                  flush=True)
        cupy_kernels.TUNING.update(base)
    for mib in (16, 32, 64, 256):
        dma = VLLMPagedMemGPUConnectorV2(s.meta, s.layout, backend="cupy", transfer="dma",
                                             staging_mib=mib)
        for tokens in (1024, 8192):
            st, ld = bench_connector(s, dma, tokens, reps)
            rows.append({"path": "dma", "staging_mib": mib, "tokens": tokens,
                         "store_GBps": st / 1e9, "retrieve_GBps": ld / 1e9})
            print(f"  sweep dma staging {mib} MiB {tokens}: store {st/1e9:.1f} GB/s, "
                  f"retrieve {ld/1e9:.1f}", flush=True)
        del dma
        torch.cuda.empty_cache()
    # where the time of a small transfer goes (mapped path, 1k tokens)
    starts, ends = chunks(1024)
    objs = [s.alloc.allocate(mapped.get_shape(e - b), DTYPE, mapped.fmt) for b, e in zip(starts, ends)]
    src = s.slots(1024, 1)
    stream = torch.cuda.current_stream()
    enq, kern = [], []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        e0 = stream.record_event(torch.cuda.Event(enable_timing=True))
        h = cupy_kernels.launch_transfer(s.kv, s.layout, [o.tensor for o in objs], src, starts,
                                         to_paged=False, single_layer=False, stream=stream)
        e1 = stream.record_event(torch.cuda.Event(enable_timing=True))
        enq.append(time.perf_counter() - t0)
        h.wait()
        kern.append(e0.elapsed_time(e1) / 1e3)
    for o in objs:
        o.ref_count_down()
    row = {"path": "breakdown_1k_mapped_store", "enqueue_s": statistics.median(enq[1:]),
           "gpu_s": statistics.median(kern[1:])}
    print(f"  1k mapped store: host enqueue {row['enqueue_s']*1e6:.0f} us, stream time "
          f"{row['gpu_s']*1e6:.0f} us", flush=True)
    rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 16384, 32768])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prefill", action="store_true")
    ap.add_argument("--prefill-tokens", type=int, default=16384)
    ap.add_argument("--sweep", action="store_true", help="also try launch-shape variants")
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--profile-engine", action="store_true",
                    help="time the engine's steps one by one at 8k and the largest size")
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat the size sweep this many times (the summary gives the spread)")
    ap.add_argument("--engine-only", action="store_true",
                    help="per size only the ceiling, the dma connector and the engine")
    ap.add_argument("--store-steps", type=int, default=5, help="prefill loop steps (--prefill)")
    ap.add_argument("--json", help="write all numbers to this file")
    args = ap.parse_args()
    assert torch.cuda.is_available() and cupy_kernels.cupy_available(), "needs CUDA and CuPy"
    result: dict = {"device": device_info(), "tuning": dict(cupy_kernels.TUNING), "sizes": [],
                    "runs": []}
    print(json.dumps(result["device"]), flush=True)
    sizes = sorted(set(args.tokens + ([args.prefill_tokens] if args.prefill else [])))
    s = Setup(max(sizes))
    dma = VLLMPagedMemGPUConnectorV2(s.meta, s.layout, backend="cupy", transfer="dma")
    mapped = VLLMPagedMemGPUConnectorV2(s.meta, s.layout, backend="cupy", transfer="mapped")
    slow = TorchPagedMemGPUConnector(s.meta, s.layout)
    engines = {}
    if not args.no_engine:
        try:
            kinds = ("dma",) if args.engine_only else ("dma", "mapped")
            engines = {t: make_engine(s, t) for t in kinds}
        except Exception as err:  # report, and measure through the connector only
            print(f"engine unavailable ({type(err).__name__}: {err}); connector only", flush=True)
            result["engine_error"] = repr(err)
    if args.sweep:
        result["sweep"] = sweep(s, args.reps)
    for run in range(args.runs):
        rows = []
        for tokens in sizes:
            row = {"tokens": tokens, "bytes": tokens * BYTES_PER_TOKEN, "run": run}
            row["ceil_h2d"], row["ceil_d2h"] = ceiling(tokens, args.reps)
            row["dma_store"], row["dma_retrieve"] = bench_connector(s, dma, tokens, args.reps)
            if not args.engine_only:
                row["mapped_store"], row["mapped_retrieve"] = bench_connector(s, mapped, tokens,
                                                                              args.reps)
                row["torch_store"], row["torch_retrieve"] = bench_connector(
                    s, slow, tokens, max(1, args.reps // 2))
                if tokens <= 8192:
                    row["lw_store"], row["lw_retrieve"] = bench_layerwise(s, tokens, args.reps)
            for transfer, engine in engines.items():
                row[f"engine_{transfer}"] = bench_engine(s, engine, tokens, args.reps)
                if transfer == "dma":
                    row["engine_dma_req"] = bench_engine(s, engine, tokens, args.reps,
                                                         req_id=f"bench-{run}-{tokens}")
            rows.append(row)
            print(json.dumps(row), flush=True)
        result["runs"].append(rows)
    result["sizes"] = result["runs"][-1]
    if args.profile_engine and "dma" in engines:
        result["engine_breakdown"] = {
            t: profile_engine(s, engines["dma"], t, args.reps)
            for t in sorted({min(8192, max(sizes)), max(sizes)})}
    if args.prefill:
        model = build_model(args.prefill_tokens)
        result["prefill_s"] = bench_prefill(model, args.prefill_tokens, max(2, args.reps // 2))
        print(json.dumps({"prefill_s": result["prefill_s"]}), flush=True)
        if engines:
            result["prefill_store"] = bench_prefill_with_store(
                s, model, args.prefill_tokens, args.store_steps, max(1, args.runs))
            print(json.dumps({"prefill_store": result["prefill_store"]}), flush=True)
        del model
        torch.cuda.empty_cache()
    for rows in result["runs"][:-1]:
        result["sizes"] = rows
        print_table({k: v for k, v in result.items() if k not in ("prefill_s", "prefill_store")},
                    args)
    result["sizes"] = result["runs"][-1]
    print_table(result, args)
    print_spread(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def print_spread(result: dict) -> None:
    """Engine fractions of the ceiling over every run: min-max per size and direction."""
    if len(result["runs"]) < 2 and "prefill_store" not in result:
        return
    print(f"\nengine (dma) fraction of the ceiling over {len(result['runs'])} run(s), min-max:")
    print("| tokens | store (hash included) | retrieve (hash included) | store (request's hashes "
          "cached) | retrieve (cached) |")
    print("|---:|---:|---:|---:|---:|")
    by: dict[int, dict[str, list[float]]] = {}
    for rows in result["runs"]:
        for r in rows:
            for key in ("engine_dma", "engine_dma_req"):
                e = r.get(key)
                if e:
                    d = by.setdefault(r["tokens"], {})
                    d.setdefault(key + "_st", []).append(e["store_Bps"] / r["ceil_d2h"])
                    d.setdefault(key + "_rt", []).append(e["retrieve_Bps"] / r["ceil_h2d"])
    for tokens, d in sorted(by.items()):
        cells = [f"{min(v):.1%}-{max(v):.1%}" if v else "-" for v in
                 (d.get("engine_dma_st", []), d.get("engine_dma_rt", []),
                  d.get("engine_dma_req_st", []), d.get("engine_dma_req_rt", []))]
        print(f"| {tokens} | " + " | ".join(cells) + " |")
    ps = result.get("prefill_store")
    if ps:
        base = ps["none"]
        print(f"\nprefill loop, {ps['tokens']} tokens x {ps['steps']} steps, {ps['rounds']} "
              f"round(s) (median s/step): no store {base * 1e3:.1f} ms; concurrent store of the "
              f"previous step's KV, wait=False {ps['async'] * 1e3:.1f} ms "
              f"({ps['async'] / base - 1:+.1%}); host-waiting store {ps['sync'] * 1e3:.1f} ms "
              f"({ps['sync'] / base - 1:+.1%}); tokens stored {ps['stored_tokens']}")


def print_table(result: dict, args) -> None:
    def cell(r, bps, ceil):
        return f"{bps / 1e9:5.1f} ({bps / r[ceil]:4.0%})"

    print("\nGB/s, and in () the fraction of the pinned copy_ ceiling in the same direction "
          "(store: D2H, retrieve: H2D)")
    head = (f"{'tokens':>6} {'MiB':>5} | {'ceil D2H/H2D':>12} | {'engine(dma) store':>17} "
            f"{'retrieve':>12} | {'engine(mapped) st':>17} {'retrieve':>12} | "
            f"{'conn dma store':>14} {'retrieve':>12} | {'conn mapped st':>14} {'retrieve':>12} | "
            f"{'torch st/rt':>11} | {'layerwise st/rt':>15}")
    print(head)
    for r in result["sizes"]:
        parts = [f"{r['tokens']:>6} {r['bytes'] / 2**20:5.0f}",
                 f"{r['ceil_d2h'] / 1e9:5.1f}/{r['ceil_h2d'] / 1e9:5.1f} "]
        for t in ("dma", "mapped"):
            e = r.get(f"engine_{t}")
            parts.append(f"{cell(r, e['store_Bps'], 'ceil_d2h'):>17} "
                         f"{cell(r, e['retrieve_Bps'], 'ceil_h2d'):>12}" if e else f"{'n/a':>30}")
        for t in ("dma", "mapped"):
            parts.append(f"{cell(r, r[t + '_store'], 'ceil_d2h'):>14} "
                         f"{cell(r, r[t + '_retrieve'], 'ceil_h2d'):>12}" if t + "_store" in r
                         else f"{'-':>27}")
        parts.append(f"{r['torch_store'] / 1e9:5.1f}/{r['torch_retrieve'] / 1e9:5.1f}"
                     if "torch_store" in r else f"{'-':>11}")
        parts.append(f"{r['lw_store'] / 1e9:7.1f}/{r['lw_retrieve'] / 1e9:5.1f}"
                     if "lw_store" in r else f"{'-':>15}")
        print(" | ".join(parts))
    if "prefill_s" in result:
        pt = args.prefill_tokens
        row = next(r for r in result["sizes"] if r["tokens"] == pt)
        if "engine_dma" in row:
            retr, via = row["engine_dma"]["retrieve_s"], "engine, dma"
        else:
            retr, via = row["bytes"] / row["dma_retrieve"], "connector, dma"
        result["prefill_speedup"] = result["prefill_s"] / retr
        print(f"\nprefill of {pt} tokens (Llama-3-8B shape, random bf16 weights, sdpa): "
              f"{result['prefill_s'] * 1e3:.1f} ms; lmcache retrieve of its KV ({via}): "
              f"{retr * 1e3:.1f} ms; speed-up {result['prefill_speedup']:.1f}x")


if __name__ == "__main__":
    main()
