"""``python -m lmcache.mp_server.blend_bench [--tokens 512] [--layers 8] [--reps 5] [--device cpu]``

Times the BlendServer through a real ``python -m lmcache.mp_server blend=cacheblend`` process
and lmcache's MP adapter: CB_LOOKUP of a prompt ``sys + SEP + B + SEP + A`` whose documents A
and B were stored alone, CB_RETRIEVE of both (K re-positioned) and, as the no-RoPE reference,
CB_RETRIEVE of A alone at the position it was stored at. KV: ``--layers`` layers, 8 KV heads,
head 128, float32, block 16 (``cpu`` shared memory or ``cuda`` IPC). Prints a markdown table of
medians (after one warm-up) and checks every retrieve reported True.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import zmq

SEP = [9999, 9998]
H, D, N = 8, 128, 16


def _start(port: int) -> subprocess.Popen:
    from lmcache.v1.multiprocess.mq import MessageQueueClient
    from lmcache.v1.multiprocess.protocol import RequestType

    proc = subprocess.Popen([sys.executable, "-m", "lmcache.mp_server", "--port", str(port),
                             "--log-level", "WARNING", "blend=cacheblend", "chunk_size=256",
                             f"token_database.separator_tokens=[{SEP[0]},{SEP[1]}]"],
                            env=dict(os.environ))
    client = MessageQueueClient(f"tcp://localhost:{port}", zmq.Context.instance())
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise RuntimeError(f"lmcache MP server exited with {proc.returncode}")
            if client.submit_request(RequestType.GET_CHUNK_SIZE, []).wait(0.5):
                return proc
        raise RuntimeError("lmcache MP server not ready after 120 s")
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--tokens", type=int, default=512, help="tokens per document")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=5571)
    args = p.parse_args(argv)
    from lmcache.integration.vllm.vllm_multi_process_adapter import (
        LMCacheMPWorkerAdapter, ParallelStrategy)

    t, L = args.tokens, args.layers
    blocks = -(-t // N)
    proc = _start(args.port)
    try:
        w = LMCacheMPWorkerAdapter(f"tcp://localhost:{args.port}", zmq.Context.instance(), "m",
                                   N, ParallelStrategy(False, 1, 0, 1, 0, 1, 1), mq_timeout=120)
        whole = torch.randn(L, 6 * blocks + 8, H, N, 2 * D, device=args.device)
        w.register_kv_caches({f"layers.{i}": whole[i] for i in range(L)})
        a, b = list(range(1000, 1000 + t)), list(range(100000, 100000 + t))
        w.cb_store(a, list(range(blocks)))
        w.cb_store(b, list(range(blocks, 2 * blocks)))
        prompt = list(range(10, 42)) + SEP + b + SEP + a
        dst = list(range(2 * blocks, 2 * blocks + -(-len(prompt) // N)))
        times: dict[str, list[float]] = {"CB_LOOKUP": [], "CB_RETRIEVE A+B, re-RoPE": [],
                                         "CB_RETRIEVE A at stored position": []}
        for rep in range(args.reps + 1):
            t0 = time.perf_counter()
            hits = w.cb_lookup(f"r{rep}", prompt)
            t1 = time.perf_counter()
            ok = w.cb_retrieve(f"r{rep}", prompt, dst, hits)
            t2 = time.perf_counter()
            same = w.cb_lookup(f"s{rep}", a)
            t3 = time.perf_counter()
            ok += w.cb_retrieve(f"s{rep}", a, dst, same)
            t4 = time.perf_counter()
            if ok != [True] * 3:
                raise RuntimeError(f"a retrieve missed: {ok}")
            if rep:
                for name, dt in zip(times, (t1 - t0, t2 - t1, t4 - t3)):
                    times[name].append(dt)
        seg_mb = 2 * L * t * H * D * 4 / 1e6
        print(f"{t} tokens per document, {L} layers, {args.device}\n")
        print("| request | median ms | KV MB | GB/s |\n|---|---:|---:|---:|")
        for (name, v), mb in zip(times.items(), (0.0, 2 * seg_mb, seg_mb)):
            m = statistics.median(v)
            print(f"| {name} | {m * 1e3:.1f} | {mb:.0f} | "
                  f"{mb / 1e3 / m if mb else float('nan'):.2f} |")
        w.shutdown()
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
