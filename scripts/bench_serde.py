#!/usr/bin/env python3
"""Benchmark the serdes (naive, cachegen, kivi, fp8): size, speed, and quality on real KV.

Three tables (printed; ``--json PATH`` also writes them):

1. **Size and quality** on the trained tiny Llama's real KV (``lmcache.experiments.
   trained_model``): ``--prompts`` license passages of ``--tokens`` tokens are prefilled; their
   KV (bf16, chunks of 256 tokens, LMCache's ``[2, L, T, D]``) goes through each serde; then 32
   tokens are generated greedily from the decoded KV. Greedy agreement = share of the 32
   positions whose token equals the naive pass's; NLL = mean negative log-likelihood of the
   naive pass's 32 tokens under the decoded KV (teacher forced); teacher-forced top-1 = share
   of those 32 positions whose argmax is the naive token. Bytes per token and the ratio
   are against bf16 (2 bytes per element).
2. **CPU speed per core** (``torch.set_num_threads(1)``) on that KV: MB/s of decoded KV
   (bf16-equivalent bytes) for serialize and deserialize, median of ``--repeats``.
3. **GPU speed** (when CUDA is present) on an 8B-shaped chunk ``[2, 32, 256, 1024]`` bf16
   (random data, 32 MiB): ``device=cuda`` serdes, (a) whole deserialize from host bytes to a
   GPU tensor, (b) the decode arithmetic on a GPU-resident body (kivi, fp8). GB/s of decoded KV.

Usage: ``python scripts/bench_serde.py [--tokens 512] [--prompts 4] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lmcache.experiments.kv_quality import (  # noqa: E402
    greedy_from_kv, load_passages, prefill_kv, teacher_forced)
from lmcache.memory.memory_format import MemoryFormat  # noqa: E402
from lmcache.memory.memory_obj import MemoryObj  # noqa: E402
from lmcache.serde import compressed  # noqa: E402
from lmcache.serde.cachegen import CacheGenSerde  # noqa: E402
from lmcache.serde.fp8 import FP8Serde  # noqa: E402
from lmcache.serde.kivi import KIVISerde  # noqa: E402
from lmcache.serde.naive import NaiveSerde  # noqa: E402

CHUNK = 256
GEN = 32


class Heap:
    """allocator_backend stand-in: standalone MemoryObjs (no pool) for benchmarking."""

    def allocate(self, shape, dtype, fmt):
        n = torch.Size(shape).numel() * dtype.itemsize
        return MemoryObj(torch.empty(n, dtype=torch.uint8), shape, dtype, fmt)


def serdes(head_size: int, device: str = "cpu"):
    return {
        "naive": NaiveSerde(),
        "cachegen": CacheGenSerde(device=device),  # LMCache's bins: 32 (keys < 10, values < 2), 16
        "cachegen-16": CacheGenSerde(key_bins=[16, 16], value_bins=[16, 16], device=device),
        "cachegen-16/8": CacheGenSerde(key_bins=[16, 8], value_bins=[16, 8], key_early_layers=1,
                                       value_early_layers=1, device=device),
        "cachegen-16/8-g8": CacheGenSerde(key_bins=[16, 8], value_bins=[16, 8],
                                          key_early_layers=1, value_early_layers=1,
                                          channel_group=8, device=device),
        "kivi": KIVISerde(device=device),
        "kivi-g64": KIVISerde(group_size=64, device=device),
        "fp8": FP8Serde(head_size=head_size, device=device),
    }


def obj_of(x: torch.Tensor) -> MemoryObj:
    x = x.contiguous()
    return MemoryObj(x.view(-1).view(torch.uint8).clone(), x.shape, x.dtype, MemoryFormat.KV_2LTD)


def round_trip(serde, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    meta, payload = serde.serialize(obj_of(x))
    wire = bytes(payload)
    back = serde.deserialize(meta, wire, Heap())
    return back.tensor.clone(), len(wire)


# ---- real KV from the trained model (helpers: lmcache.experiments.kv_quality) ------------
def quality(model, ids: torch.Tensor, kv: torch.Tensor, ref_tokens=None):
    """Greedy 32 tokens from cache ``kv`` (+ the last prompt token), and the NLL and
    teacher-forced top-1 of ``ref_tokens`` (default: those 32) under the same cache."""
    last = int(ids[-1])
    out = greedy_from_kv(model, kv, last, GEN)
    nll, top1 = teacher_forced(model, kv, last, out if ref_tokens is None else ref_tokens)
    return out, nll, top1


def size_and_quality(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmcache.experiments.trained_model import tiny_model_path

    path = tiny_model_path("trained")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    heads, head_size = model.config.num_key_value_heads, model.config.head_dim
    rows = {name: {"bytes": 0, "elems": 0, "agree": [], "nll": [], "top1": []}
            for name in serdes(head_size)}
    kv_chunks = []
    for ids in load_passages(tok, args.corpus, args.prompts, args.tokens):
        exact, _ = prefill_kv(model, ids)  # float32, as computed
        kv = exact.to(torch.bfloat16)
        chunks = list(kv.split(CHUNK, dim=2))
        kv_chunks += chunks
        ref_tokens = None
        for name, serde in serdes(head_size).items():
            decoded = []
            for c in chunks:
                out, nbytes = round_trip(serde, c)
                decoded.append(out)
                rows[name]["bytes"] += nbytes
                rows[name]["elems"] += c.numel()
            gen, nll, top1 = quality(model, ids, torch.cat(decoded, dim=2).float(), ref_tokens)
            if name == "naive":
                ref_tokens, gen_ref = gen, gen
            rows[name]["agree"].append(sum(a == b for a, b in zip(gen, gen_ref)) / GEN)
            rows[name]["nll"].append(nll)
            rows[name]["top1"].append(top1)
        # noise floor of the metrics: the float32 KV as computed (no bf16 rounding at all)
        gen, nll, top1 = quality(model, ids, exact, ref_tokens)
        floor = rows.setdefault("fp32-unrounded", {"bytes": 0, "elems": 0, "agree": [],
                                                   "nll": [], "top1": []})
        floor["bytes"] += exact.numel() * 4
        floor["elems"] += exact.numel()
        floor["agree"].append(sum(a == b for a, b in zip(gen, ref_tokens)) / GEN)
        floor["nll"].append(nll)
        floor["top1"].append(top1)
    table = []
    tokens_total = rows["naive"]["elems"] / (2 * model.config.num_hidden_layers * heads * head_size)
    for name, r in rows.items():
        table.append({
            "serde": name,
            "bytes_per_token": round(r["bytes"] / tokens_total, 1),
            "x_smaller_than_bf16": round(2 * r["elems"] / r["bytes"], 2),
            "greedy_agreement_pct": round(100 * statistics.mean(r["agree"]), 1),
            "teacher_forced_top1_pct": round(100 * statistics.mean(r["top1"]), 1),
            "nll_of_naive_output": round(statistics.mean(r["nll"]), 4),
        })
    return table, kv_chunks, head_size


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_speed(chunks, head_size, repeats):
    torch.set_num_threads(1)
    table = []
    for name, serde in serdes(head_size).items():
        objs = [obj_of(c) for c in chunks]
        encoded = [(m, bytes(p)) for m, p in (serde.serialize(o) for o in objs)]
        nbytes = sum(c.numel() * 2 for c in chunks)
        enc = _median_time(lambda: [serde.serialize(o) for o in objs], repeats)
        dec = _median_time(lambda: [serde.deserialize(m, p, Heap()) for m, p in encoded], repeats)
        table.append({"serde": name, "encode_MBps_per_core": round(nbytes / enc / 1e6, 1),
                      "decode_MBps_per_core": round(nbytes / dec / 1e6, 1)})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return table


def gpu_speed(repeats):
    from lmcache.serde import fp8, kivi

    x = (torch.randn(2, 32, CHUNK, 1024) * 0.5).to(torch.bfloat16)
    nbytes = x.numel() * 2
    table = []
    sync = torch.cuda.synchronize
    for name, serde in serdes(128, "cuda").items():
        if name == "naive":
            continue
        try:
            table.append(_gpu_row(name, serde, x, nbytes, repeats, sync))
        except Exception as e:  # report and go on with the other serdes
            print(f"GPU benchmark of {name} failed: {e!r}")
    return table


def _event_gbps(fn, nbytes, repeats):
    """GB/s of ``nbytes`` per call of ``fn`` (CUDA events, median of 4 x repeats)."""
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats * 4):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return round(nbytes / statistics.median(times) / 1e9, 1)


def _gpu_row(name, serde, x, nbytes, repeats, sync):
    from lmcache.serde import fp8, kivi

    if True:
        meta, payload = serde.serialize(obj_of(x))
        wire = bytes(payload)
        enc = _median_time(lambda: (serde.serialize(obj_of(x)), sync()), repeats)

        def full():
            _, decode, fmt, dtype, shape = compressed.parse_header(wire)
            out = decode(memoryview(wire)[compressed.HEADER_SIZE:], 2, 32, CHUNK, 1024,
                         "cuda", dtype).to(dtype)
            sync()
            return out

        full()
        dec = _median_time(full, repeats)
        row = {"serde": name, "x_smaller": round(nbytes / len(wire), 2),
               "encode_GBps_host_to_host": round(nbytes / enc / 1e9, 2),
               "decode_GBps_host_bytes_to_gpu": round(nbytes / dec / 1e9, 2)}
        if name.startswith("cachegen"):
            from lmcache.serde import cachegen, cachegen_cuda

            shape = (2, 32, CHUNK, 1024)
            parts = cachegen.parse_body(memoryview(wire)[compressed.HEADER_SIZE:], *shape)
            tab = cachegen_cuda.upload(parts, *shape, "cuda")

            def resident():
                q = cachegen_cuda.decode_uploaded(tab, *shape)
                return cachegen.dequantize(q, parts, 32).to(torch.bfloat16)

            row["decode_GBps_gpu_resident"] = _event_gbps(resident, nbytes, repeats)
        mod = {"kivi": kivi, "kivi-g64": kivi, "fp8": fp8}.get(name)
        if mod is not None:
            body = torch.frombuffer(bytearray(wire[compressed.HEADER_SIZE:]),
                                    dtype=torch.uint8).cuda()

            def resident():
                out = mod.decode_body(body, 2, 32, CHUNK, 1024, "cuda",
                                      torch.bfloat16).to(torch.bfloat16)
                return out

            row["decode_GBps_gpu_resident"] = _event_gbps(resident, nbytes, repeats)
        return row


def plot(result: dict, path: Path) -> None:
    """Size vs quality of the ``quality`` table: x = times smaller than bf16, y = NLL of the
    naive output (left) and teacher-forced top-1 / greedy agreement (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["quality"] if r["serde"] != "fp32-unrounded"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        x = r["x_smaller_than_bf16"]
        a.scatter(x, r["nll_of_naive_output"])
        a.annotate(r["serde"], (x, r["nll_of_naive_output"]), fontsize=8)
        b.scatter(x, r["greedy_agreement_pct"], marker="o", color="tab:blue")
        b.scatter(x, r["teacher_forced_top1_pct"], marker="^", color="tab:orange")
        b.annotate(r["serde"], (x, r["greedy_agreement_pct"]), fontsize=8)
    a.set_xlabel("times smaller than bf16")
    a.set_ylabel("NLL of the naive output (nats/token)")
    b.set_xlabel("times smaller than bf16")
    b.set_ylabel("% agreement (o greedy, ^ teacher-forced)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle("serdes on the trained tiny Llama's KV: size vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def show(title, table):
    print(f"\n{title}")
    cols = list(dict.fromkeys(c for row in table for c in row))
    print(" | ".join(cols))
    for row in table:
        print(" | ".join(str(row.get(c, "")) for c in cols))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--corpus", default="/usr/share/common-licenses",
                   help="directory of the prompt documents")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--plot", type=Path, help="PNG of size vs quality (needs matplotlib)")
    p.add_argument("--plot-from", type=Path, help="only plot the quality table of this JSON")
    args = p.parse_args()
    if args.plot_from:
        plot(json.loads(args.plot_from.read_text()), args.plot)
        return
    result = {}
    if not args.skip_quality:
        table, chunks, head_size = size_and_quality(args)
        show("size and quality on the trained tiny Llama's KV (vs the naive pass)", table)
        result["quality"] = table
        result["cpu"] = cpu_speed(chunks[:4], head_size, args.repeats)
        show("CPU, one core (MB/s of decoded bf16 KV)", result["cpu"])
    if torch.cuda.is_available():
        result["gpu"] = gpu_speed(args.repeats)
        show(f"{torch.cuda.get_device_name()}, 8B-shaped chunk [2,32,256,1024] bf16 (GB/s)",
             result["gpu"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot and "quality" in result:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
