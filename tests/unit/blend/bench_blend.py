"""Benchmark (not a test): Blender cost vs a plain layerwise prefill, on an 8B-shaped model.

Layers shaped like Llama-3-8B (hidden 4096, 32 heads, 8 KV heads of 128, MLP 14336), random
weights, plain torch modules (blend_torch_model; no vLLM needed), so only ``--layers`` of the 32
layers are built. Prints one row per pass: median wall time, and its ratio to the full prefill
(the ceiling a blend must stay under; ratio 0.15 should cost about the check layers plus 15 %).

    PYTHONPATH=src:tests/unit/blend python tests/unit/blend/bench_blend.py --tokens 16384
"""

import argparse
import statistics
import time

import torch

from blend_torch_model import build
from lmcache.blend.blender import Blender
from lmcache.blend.layerwise_model import LayerwiseModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev, dtype = args.device, torch.bfloat16
    model = LayerwiseModel(build(vocab=32000, hidden=4096, layers=args.layers, heads=32,
                                 kv_heads=8, inter=14336, dtype=dtype, device=dev))
    ids = torch.randint(0, 32000, (args.tokens,), device=dev)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    def timed(fn):
        fn()
        sync()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    cache = model.prefill(ids)
    rows = [("full prefill (layerwise)", timed(lambda: model.prefill(ids)))]
    for ratio in (0.0, 0.15, 0.3, 1.0):
        blender = Blender(model, [1], [ratio])
        copies = [(k.clone(), v.clone()) for k, v in cache]
        rows.append((f"blend ratio {ratio}", timed(lambda: blender.blend(ids, copies))))
    base = rows[0][1]
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(f"{name}, {args.tokens} tokens, {args.layers} layers of an 8B shape, bf16")
    print(f"{'pass':28s} {'ms':>9s} {'x prefill':>10s}")
    for label, sec in rows:
        print(f"{label:28s} {sec * 1e3:9.1f} {sec / base:10.3f}")


if __name__ == "__main__":
    main()
