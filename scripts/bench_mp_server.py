#!/usr/bin/env python3
"""MP server benchmark: store/retrieve through lmcache's MP server vs the in-process engine.

Same GPU, same Llama-3-8B-shaped paged KV cache as ``scripts/bench_gpu.py`` (32 layers, 8 KV
heads, head 128, bf16, block 16, blocks scattered at random, flash_packed), same engine
configuration (chunk 256, LocalCPUBackend over a pinned CPUMemoryAllocator,
VLLMPagedMemGPUConnectorV2 with CuPy kernels, transfer=dma):

  in-process  ``bench_gpu.bench_engine``: LMCacheEngine.store / .retrieve in this process
  server      a client (vLLM's ``multi_process_adapter.py`` given with --adapter, else
              lmcache's ``vllm_multi_process_adapter``) registers the KV cache by CUDA IPC with a
              ``python -m lmcache.mp_server`` process and times, from recording the CUDA event
              to the adapter reporting the request finished: one STORE (the server's tiers
              cleared before, untimed) and one RETRIEVE of the same tokens into other blocks

Every time is the median of --reps after one warm-up; throughput = KV bytes / time; the
ratio column is server / in-process (target >= 0.90 at 8k+ tokens). The retrieve result is
checked bit for bit once per length.

Usage: PYTHONPATH=src python scripts/bench_mp_server.py [--tokens 2048 8192 16384] [--reps 5]
       [--adapter path/to/multi_process_adapter.py] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import torch
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "unit", "mp_server"))

import bench_gpu as bg  # noqa: E402
from mp_server_proc import free_port, start_server, stop_server  # noqa: E402


def load_adapter(path: str | None):
    if not path:
        from lmcache.integration.vllm import vllm_multi_process_adapter as mod
        return mod, "lmcache"
    spec = importlib.util.spec_from_file_location("vllm_mp_adapter", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, "vllm"


def blocks(s: bg.Setup, tokens: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randperm(s.num_blocks - 1, generator=gen)[: -(-tokens // bg.N)] + 1).tolist()


def wait(worker, rid: str, store: bool) -> None:
    """Poll the adapter as vLLM's worker does, sleeping 0.1 ms between polls: a loop that
    never sleeps holds the GIL and delays the client's I/O thread by Python's switch interval
    (5 ms) twice per request (measured: 8 ms vs 1.7 ms per small CPU round trip)."""
    while True:
        stores, retrieves = worker.get_finished({rid} if store else set())
        if rid in (stores if store else retrieves):
            return
        time.sleep(0.0001)


def server_seconds(admin) -> dict:
    from lmcache.v1.multiprocess.protocol import RequestType

    return admin.submit_request(RequestType.HEARTBEAT, [None, "bench"]).result(10)["counters"]


def bench_server(s: bg.Setup, mod, worker, clear, tokens: int, reps: int, admin) -> dict:
    ids = torch.randint(0, 128000, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    src, dst = blocks(s, tokens, 1), blocks(s, tokens, 2)
    count = iter(range(10**9))

    def one(store: bool) -> float:
        if store:
            clear()
        rid = f"{'s' if store else 'r'}-{tokens}-{next(count)}"
        op = mod.LoadStoreOp(block_ids=src if store else dst, token_ids=ids, start=0, end=tokens)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        event = torch.cuda.Event(interprocess=True)
        event.record()
        (worker.submit_store_request if store else worker.submit_retrieve_request)(rid, op, event)
        wait(worker, rid, store)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    one(True)
    c0 = server_seconds(admin)
    st = statistics.median(one(True) for _ in range(reps))
    c1 = server_seconds(admin)
    stored = [s.kv[layer][src].clone() for layer in range(bg.L)]  # src and dst may share blocks
    one(False)
    c2 = server_seconds(admin)
    rt = statistics.median(one(False) for _ in range(reps))
    c3 = server_seconds(admin)
    exact = all(torch.equal(stored[layer].view(torch.int16), s.kv[layer][dst].view(torch.int16))
                for layer in range(bg.L))
    del stored
    nbytes = tokens * bg.BYTES_PER_TOKEN
    return {"store_Bps": nbytes / st, "retrieve_Bps": nbytes / rt, "store_s": st,
            "retrieve_s": rt, "bit_exact": exact,
            "server_store_s": (c1["store_seconds"] - c0["store_seconds"]) / reps,
            "server_retrieve_s": (c3["retrieve_seconds"] - c2["retrieve_seconds"]) / reps,
            "server_event_wait_s": (c3["event_wait_seconds"] - c0["event_wait_seconds"]) / (2 * reps + 1)}


def rtt(admin, reps: int) -> float:
    """Median seconds of one GET_CHUNK_SIZE round trip (the protocol's fixed cost)."""
    from lmcache.v1.multiprocess.protocol import RequestType

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        admin.submit_request(RequestType.GET_CHUNK_SIZE, []).result(10)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--adapter", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--server-log", default=None)
    args = p.parse_args()
    max_tokens = max(args.tokens)
    s = bg.Setup(max_tokens)
    inproc = {}
    engine = bg.make_engine(s, "dma")
    for tokens in args.tokens:
        inproc[tokens] = bg.bench_engine(s, engine, tokens, args.reps)
    engine.close()

    gib = max_tokens * bg.BYTES_PER_TOKEN / 2**30 + 0.5
    port = free_port()
    server = start_server(port, [f"max_local_cpu_size={gib:.2f}"], log_path=args.server_log)
    mod, which = load_adapter(args.adapter)
    url = f"tcp://localhost:{port}"
    ctx = zmq.Context()
    from lmcache.v1.multiprocess.mq import MessageQueueClient
    from lmcache.v1.multiprocess.protocol import RequestType
    admin = MessageQueueClient(url, ctx)
    strategy = mod.ParallelStrategy(False, 1, 0, 1, 0, 1, 1)
    rows = []
    try:
        worker = mod.LMCacheMPWorkerAdapter(url, ctx, "bench/llama-3-8b", bg.N, strategy)
        worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(s.kv)})
        clear = lambda: admin.submit_request(RequestType.CLEAR, []).result(60)  # noqa: E731
        for tokens in args.tokens:
            srv = bench_server(s, mod, worker, clear, tokens, args.reps, admin)
            srv["rtt_s"] = rtt(admin, args.reps * 10)
            ip = inproc[tokens]
            rows.append({"tokens": tokens, "adapter": which, "inproc": ip, "server": srv,
                         "store_ratio": srv["store_Bps"] / ip["store_Bps"],
                         "retrieve_ratio": srv["retrieve_Bps"] / ip["retrieve_Bps"]})
        worker.shutdown()
    finally:
        admin.close()
        stop_server(server)
    print(f"MP server vs in-process engine ({which} adapter), {torch.cuda.get_device_name()}, "
          f"median of {args.reps}, GB/s (1e9 B/s):")
    print(f"{'tokens':>7} {'store in-proc':>14} {'store server':>13} {'ratio':>6} "
          f"{'retr in-proc':>13} {'retr server':>12} {'ratio':>6} {'bit-exact':>9} {'rtt ms':>7}")
    for r in rows:
        ip, sv = r["inproc"], r["server"]
        print(f"{r['tokens']:>7} {ip['store_Bps'] / 1e9:>14.1f} {sv['store_Bps'] / 1e9:>13.1f} "
              f"{r['store_ratio']:>6.2f} {ip['retrieve_Bps'] / 1e9:>13.1f} "
              f"{sv['retrieve_Bps'] / 1e9:>12.1f} {r['retrieve_ratio']:>6.2f} {str(sv['bit_exact']):>9}"
              f" {sv['rtt_s'] * 1e3:>7.2f}")
    print("server-side mean ms per request (copy thread): store / retrieve / event wait; "
          "in-process ms: store / retrieve")
    for r in rows:
        sv, ip = r["server"], r["inproc"]
        print(f"{r['tokens']:>7} {sv['server_store_s'] * 1e3:8.2f} {sv['server_retrieve_s'] * 1e3:8.2f}"
              f" {sv['server_event_wait_s'] * 1e3:8.3f}   {ip['store_s'] * 1e3:8.2f} {ip['retrieve_s'] * 1e3:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": bg.device_info(), "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
