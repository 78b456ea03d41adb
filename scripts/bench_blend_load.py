"""Cost of assembling CacheBlend's per-layer buffer (VLLMBufferLayerwiseGPUConnector.load_layers)
against its ceiling: a plain copy of the same segment bytes into a buffer (no RoPE, no gaps).

    python scripts/bench_blend_load.py [--device cpu|cuda] [--tokens 4096] [--threads 1]

Prints one row per dtype: ms per layer of load_layers, of the plain copy, and their ratio.
Three reused segments cover ~88 % of the prompt (the rest are gaps).
"""

from __future__ import annotations

import argparse
import time

import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.vllm_buffer_layerwise import VLLMBufferLayerwiseGPUConnector
from lmcache.metadata import LMCacheMetadata


def timed(fn, device: str, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, layers, h, d = args.tokens, args.layers, args.heads, args.head_size
    third = n // 3
    segs = [(s, s + third - 40, o) for s, o in ((40, 5), (third + 20, 40), (2 * third, 9000))]
    print(f"{'dtype':10s} {'tokens':>6s} {'load_layers ms/layer':>21s} {'plain copy ms/layer':>20s}"
          f" {'ratio':>6s}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        md = LMCacheMetadata("bench", 1, 0, dtype, (layers, 2, 256, h, d))
        conn = VLLMBufferLayerwiseGPUConnector(md, KVCacheLayout("cpu_packed", 16, h, d),
                                               rope_parameters={"rope_theta": 500000.0},
                                               device=args.device)
        srcs = [torch.randn(layers, 2, e - s, h * d).to(dtype) for s, e, _ in segs]
        if args.device == "cuda":
            srcs = [s.pin_memory() for s in srcs]
        call = ([s for s, _, _ in segs], [e for _, e, _ in segs], [o for _, _, o in segs],
                torch.arange(n))
        dst = torch.empty(2, n, h * d, dtype=dtype, device=args.device)

        def blend_load():
            for _ in conn.load_layers(srcs, *call):
                pass

        def plain():
            for layer in range(layers):
                for (s, e, _), src in zip(segs, srcs):
                    dst[:, s:e].copy_(src[layer], non_blocking=True)

        got, ceil = timed(blend_load, args.device) / layers, timed(plain, args.device) / layers
        print(f"{str(dtype).replace('torch.', ''):10s} {n:6d} {got * 1e3:21.2f} {ceil * 1e3:20.2f}"
              f" {got / ceil:6.1f}")


if __name__ == "__main__":
    main()
