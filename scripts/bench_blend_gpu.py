#!/usr/bin/env python3
"""CacheBlend's load path against its ceiling (issue 9's H200 target), on an 8B-shaped model.

Target: the blend load path of a Llama-3-8B-shaped model (32 layers, 32 query heads, 8 KV heads
of 128, hidden 4096, MLP 14336, bf16) at 16k tokens costs at most 1.5x a plain retrieve plus the
recompute of the chosen tokens. Per recompute ratio this measures, in one process:

  (a) retrieve   LMCacheEngine.retrieve of the N tokens (default config: chunked token database,
                 vllm_paged connector, CPU tier over the pinned allocator) into vLLM-layout paged
                 KV (flash_packed, block 16, blocks scattered) — the normal full-hit retrieve;
  (b) recompute  a forward of only the chosen tokens (the Blender's own selection at this ratio)
                 through every layer with LayerwiseModel, attention against the full-context K/V
                 of each layer (the chosen rows written into it first);
  (c) blend      CacheBlendRunner.blend as the vLLM worker runs it (container with
                 blend=cacheblend: retrieve_layers_for_blend = segment fetch from the CPU tier,
                 per-layer H2D into the double-buffered layer buffer, RoPE re-positioning, gap
                 zeroing; Blender = full layers up to the check layer, selection, recompute;
                 write_layer of every layer into the paged KV),

and reports (c) / ((a) + (b)). Stage rows split (c): ``load`` (the retrieve generator alone,
every layer buffer assembled, nothing computed), ``compute`` (the Blender over K/V already on the
device) and ``write`` (write_layer of all layers); load + compute + write > blend means the
per-layer load overlaps the compute. The prompt: ``--docs`` documents stored once in one order
(prompt A), then blended in another order after a system prompt and before a question (prompt B,
exactly ``--tokens`` tokens; ~99 % of it reused). Model: plain torch modules with vLLM's
attribute names (tests/unit/blend/blend_torch_model.py), random weights; ``--layers`` below 32
builds fewer layers (every time then covers only those layers, say so when quoting).

Usage (device):  PYTHONPATH=src python scripts/bench_blend_gpu.py --json out.json
Smoke (CPU):     PYTHONPATH=src python scripts/bench_blend_gpu.py --device cpu --tokens 1024 \
                     --layers 2 --hidden 256 --heads 4 --kv-heads 2 --inter 512 --vocab 1000
Times: median of ``--reps`` runs after one warm-up, the device synchronized around each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SEP = [1, 2]          # separator token ids (the segment database splits at them)
BLOCK = 16


def _torch_model_module():
    spec = importlib.util.spec_from_file_location(
        "blend_torch_model", ROOT / "tests" / "unit" / "blend" / "blend_torch_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed(fn, dev: torch.device, reps: int) -> float:
    """Median wall seconds of ``fn`` (device synchronized around each call), after a warm-up."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_model(args, dev: torch.device):
    """The random-weight vLLM-shaped LlamaForCausalLM, built directly on ``dev`` in bf16."""
    tm = _torch_model_module()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            return tm.build("LlamaForCausalLM", vocab=args.vocab, hidden=args.hidden,
                            layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                            inter=args.inter, dtype=torch.bfloat16, device=str(dev))
    finally:
        torch.set_default_dtype(old)


def prompts(n: int, docs: int, vocab: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(A, B)``: A = the documents joined by SEP; B = system + the documents in another order
    + question, joined by SEP, exactly ``n`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    system, question = 24, 24
    body = n - system - question - len(SEP) * (docs + 1)
    if body < docs:
        raise ValueError(f"--tokens {n} is too small for {docs} documents")
    sizes = [body // docs + (1 if i < body % docs else 0) for i in range(docs)]
    rand = lambda k: torch.randint(10, vocab, (k,), generator=gen).tolist()  # noqa: E731
    doc_ids = [rand(s) for s in sizes]

    def join(parts):
        out: list[int] = []
        for i, p in enumerate(parts):
            out += (SEP if i else []) + p
        return out

    order = torch.randperm(docs, generator=gen).tolist()
    a = join(doc_ids)
    b = join([rand(system)] + [doc_ids[i] for i in order] + [rand(question)])
    assert len(b) == n, (len(b), n)
    return a, b


def paged_setup(args, dev: torch.device, num_tokens: int):
    from lmcache.gpu_connector.kv_layout import KVCacheLayout
    from lmcache.metadata import LMCacheMetadata

    head = args.hidden // args.heads
    meta = LMCacheMetadata("bench/llama-3-8b-shape", 1, 0, torch.bfloat16,
                           (args.layers, 2, 256, args.kv_heads, head))
    layout = KVCacheLayout("flash_packed", BLOCK, args.kv_heads, head)
    blocks = 3 * (-(-num_tokens // BLOCK)) + 8
    gen = torch.Generator(device=dev).manual_seed(0)
    caches = [torch.randn(blocks, args.kv_heads, BLOCK, 2 * head, generator=gen, device=dev,
                          dtype=torch.bfloat16) for _ in range(args.layers)]
    perm = torch.randperm(blocks - 1, generator=torch.Generator().manual_seed(1)) + 1

    def slots(k: int, part: int) -> torch.Tensor:
        nb = -(-num_tokens // BLOCK)
        chosen = perm[part * nb:(part + 1) * nb]
        return (chosen[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:k].to(dev)

    return meta, layout, caches, slots


def container_for(overrides: list[str], meta, layout):
    from lmcache.config.compose import compose_config
    from lmcache.containers import build_worker_container

    return build_worker_container(compose_config(overrides), meta, layout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.15, 0.3])
    ap.add_argument("--check-layers", type=int, nargs="+", default=[1])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stages", action="store_true", help="also time load / compute / write alone")
    ap.add_argument("--ab-attn", action="store_true",
                    help="also time (b) and (c) with masked attention forced to the "
                         "memory-efficient SDPA kernel (CUDA)")
    ap.add_argument("--attn-sweep", action="store_true",
                    help="also time one layer's masked attention of the 0.15 selection per SDPA "
                         "backend (CUDA)")
    ap.add_argument("--ab-write", action="store_true",
                    help="also time (c) with write_layer's torch path instead of the CUDA kernel")
    ap.add_argument("--profile", default=None,
                    help="write a torch.profiler table of one blend at the first ratio >0 here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    n = args.tokens
    gib = (n * args.layers * 2 * args.hidden // args.heads * args.kv_heads * 2) * 1.3 / 2**30 + 0.05

    from lmcache.blend.layerwise_model import LayerwiseModel
    from lmcache.containers import shutdown
    from lmcache.engine.blend_layers import BlendLayerKV

    t_start = time.perf_counter()
    vllm_model = build_model(args, dev)
    model = LayerwiseModel(vllm_model)
    t_model = time.perf_counter() - t_start
    prompt_a, prompt_b = prompts(n, args.docs, args.vocab)
    meta, layout, caches, slots = paged_setup(args, dev, n)
    ids_a, ids_b = torch.tensor(prompt_a), torch.tensor(prompt_b)
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else platform.processor() or platform.machine())
    info = {"device": name, "torch": torch.__version__, "tokens": n, "argv": sys.argv[1:],
            "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
            "kv_heads": args.kv_heads, "inter": args.inter, "vocab": args.vocab,
            "docs": args.docs, "check_layers": args.check_layers, "reps": args.reps,
            "model_build_s": round(t_model, 2)}
    print(json.dumps(info))
    sys.stdout.flush()

    # (a) the plain full-hit retrieve through the default engine (chunked, vllm_paged)
    plain = container_for([f"max_local_cpu_size={gib:.3f}"], meta, layout)
    try:
        engine = plain.engine()
        stored = engine.store(ids_b, kvcaches=caches, slot_mapping=slots(n, 0))
        assert stored == n, (stored, n)

        def retrieve():
            got = engine.retrieve(ids_b, kvcaches=caches, slot_mapping=slots(n, 1))
            assert int(got.sum()) == n

        t_retrieve = timed(retrieve, dev, args.reps)
    finally:
        shutdown(plain)
    print(f"(a) retrieve of {n} tokens: {t_retrieve * 1e3:.1f} ms")
    sys.stdout.flush()

    # (c) the blend path: container with blend=cacheblend, prompt A stored as segments
    blend = container_for([f"max_local_cpu_size={gib:.3f}", "blend=cacheblend",
                           f"token_database.separator_tokens=[{SEP[0]},{SEP[1]}]",
                           f"gpu_connector.device={dev.type}",
                           f"blend.blend_check_layers=[{','.join(map(str, args.check_layers))}]",
                           "blend.blend_min_tokens=1"], meta, layout)
    rows = []
    try:
        engine = blend.engine()
        runner = blend.blender()
        runner.attach_model(vllm_model)
        conn = engine.gpu_connector
        stored = engine.store(ids_a, kvcaches=caches, slot_mapping=slots(len(prompt_a), 0))
        assert stored >= len(prompt_a) - len(SEP) * (args.docs - 1), stored
        slots_b = slots(n, 1)
        full_kv = caches_kv(model, n, dev)  # the K/V (b) attends over
        for ratio in args.ratios:
            runner.ratio = ratio

            def blend_once():
                assert runner.blend(ids_b, caches, slots_b) is not None

            t_blend = timed(blend_once, dev, args.reps)
            sel = runner.last_recomputed.to(dev)
            t_recompute = timed(lambda: recompute(model, ids_b.to(dev), sel, full_kv), dev,
                                args.reps)
            row = {"ratio": ratio, "recomputed_tokens": int(sel.numel()),
                   "reused_tokens": int(engine.blend_lookup(ids_b).sum()),
                   "retrieve_ms": t_retrieve * 1e3, "recompute_ms": t_recompute * 1e3,
                   "blend_ms": t_blend * 1e3}
            row["x_ceiling"] = t_blend / (t_retrieve + t_recompute)
            if args.stages:
                row.update(stages(engine, runner, conn, caches, ids_b, slots_b, dev, args))
            if args.ab_attn and dev.type == "cuda":
                from torch.nn.attention import SDPBackend

                for m in (model, runner.model):
                    m.masked_attention_backends = [SDPBackend.EFFICIENT_ATTENTION]
                try:
                    row["blend_efficient_attn_ms"] = timed(blend_once, dev, args.reps) * 1e3
                    row["recompute_efficient_attn_ms"] = timed(
                        lambda: recompute(model, ids_b.to(dev), sel, full_kv), dev,
                        args.reps) * 1e3
                finally:
                    for m in (model, runner.model):
                        m.masked_attention_backends = None
            if args.ab_write and dev.type == "cuda":
                conn.write_kernel = False
                try:
                    row["blend_torch_write_ms"] = timed(blend_once, dev, args.reps) * 1e3
                finally:
                    conn.write_kernel = True
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in row.items()}))
            sys.stdout.flush()
        if args.attn_sweep and dev.type == "cuda":
            runner.ratio = next((r for r in args.ratios if r > 0), args.ratios[0])
            blend_once()
            sweep = attention_sweep(model, runner.last_recomputed.to(dev), n, dev, args.reps)
            print(json.dumps({"attention_sweep_ms": sweep}))
            info["attention_sweep_ms"] = sweep
        if args.profile:
            ratio = next((r for r in args.ratios if r > 0), args.ratios[0])
            runner.ratio = ratio
            profile(lambda: runner.blend(ids_b, caches, slots_b), dev, args.profile)
    finally:
        shutdown(blend)

    head = (f"{'ratio':>5s} {'recomp':>7s} {'(a) retrieve':>12s} {'(b) recompute':>13s} "
            f"{'(c) blend':>10s} {'c/(a+b)':>8s}")
    print(f"\n{info['device']}, {n} tokens, {args.layers} layers of a Llama-3-8B shape, bf16, "
          f"check layers {args.check_layers}; ms, median of {args.reps}")
    print(head)
    for r in rows:
        print(f"{r['ratio']:5.2f} {r['recomputed_tokens']:7d} {r['retrieve_ms']:12.1f} "
              f"{r['recompute_ms']:13.1f} {r['blend_ms']:10.1f} {r['x_ceiling']:8.2f}")
    if args.stages:
        print(f"\n{'ratio':>5s} {'load ms':>8s} {'compute ms':>10s} {'write ms':>9s} "
              f"{'sum':>8s} {'blend':>8s}")
        for r in rows:
            s = r["load_ms"] + r["compute_ms"] + r["write_ms"]
            print(f"{r['ratio']:5.2f} {r['load_ms']:8.1f} {r['compute_ms']:10.1f} "
                  f"{r['write_ms']:9.1f} {s:8.1f} {r['blend_ms']:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


def caches_kv(model, n: int, dev: torch.device):
    """Per layer ``(k, v)`` ``[n, kv_size]`` on ``dev`` (random): the full-context K/V the
    recompute of (b) attends over (made once)."""
    gen = torch.Generator(device=dev).manual_seed(5)
    return [(torch.randn(n, model.kv_size, generator=gen, device=dev, dtype=model.dtype),
             torch.randn(n, model.kv_size, generator=gen, device=dev, dtype=model.dtype))
            for _ in range(model.num_layers)]


@torch.inference_mode()
def recompute(model, ids: torch.Tensor, sel: torch.Tensor, kv) -> None:
    """(b): every layer for the tokens ``sel`` only, attending over the full-context K/V."""
    if not sel.numel():
        return
    pos = torch.arange(ids.numel(), device=ids.device)
    sel_pos = pos[sel]
    hidden, residual = model.embed(ids[sel]), None
    for i in range(model.num_layers):
        q, k, v, residual = model.qkv(i, hidden, residual, sel_pos)
        full_k, full_v = kv[i]
        full_k[sel] = k
        full_v[sel] = v
        if i + 1 < model.num_layers:
            attn = model.attention(i, q, sel_pos, full_k, full_v, pos)
            hidden, residual = model.finish(i, attn, residual)
    model.release_attention_cache()


def attention_sweep(model, sel: torch.Tensor, n: int, dev: torch.device, reps: int) -> dict:
    """ms of one layer's attention of the selected queries over ``n`` keys, per SDPA backend
    (masked, as the Blender runs it), and two references without a mask."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=dev).manual_seed(9)
    h, d = model.num_heads, model.head_size
    q = torch.randn(1, h, sel.numel(), d, generator=gen, device=dev, dtype=model.dtype)
    k = torch.randn(1, h, n, d, generator=gen, device=dev, dtype=model.dtype)
    v = torch.randn_like(k)
    pos = torch.arange(n, device=dev)
    allowed = pos[None, :] <= pos[sel][:, None]
    bias = torch.zeros(allowed.shape, dtype=model.dtype, device=dev).masked_fill_(
        ~allowed, float("-inf"))
    out = {}
    for name, backend in (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
        def run(mask=bias, backend=backend):
            ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            with ctx:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        for label, mask in ((f"{name} float bias", bias), (f"{name} bool mask", allowed)):
            try:
                out[label] = round(timed(lambda: run(mask), dev, reps) * 1e3, 3)
            except RuntimeError as exc:
                out[label] = f"unavailable: {str(exc)[:60]}"
    out["flash, no mask (all keys)"] = round(timed(
        lambda: F.scaled_dot_product_attention(q, k, v), dev, reps) * 1e3, 3)
    qf = torch.randn(1, h, n, d, generator=gen, device=dev, dtype=model.dtype)
    out["flash causal, all n queries"] = round(timed(
        lambda: F.scaled_dot_product_attention(qf, k, v, is_causal=True), dev, reps) * 1e3, 3)
    return out


def stages(engine, runner, conn, caches, ids, slots, dev, args) -> dict:
    """The blend path's parts alone: load (retrieve generator), compute (Blender over K/V on
    the device), write (write_layer of every layer)."""
    from lmcache.engine.blend_layers import BlendLayerKV

    layers, rot = args.layers, runner.model.fused_rotary_emb

    def load():
        kv = BlendLayerKV(engine.retrieve_layers_for_blend(ids, device=dev, rotary=rot), layers)
        try:
            for i in range(layers):
                kv[i]
        finally:
            kv.close()

    kv = BlendLayerKV(engine.retrieve_layers_for_blend(ids, device=dev, rotary=rot), layers)
    try:
        mask = kv.mask
        copies = [tuple(t.clone() for t in kv[i]) for i in range(layers)]
    finally:
        kv.close()
    uncached = (~mask).to(dev)
    blender = runner.blender
    t_load = timed(load, dev, args.reps)
    t_compute = timed(lambda: blender.blend(ids, copies, uncached=uncached), dev, args.reps)

    def write():
        for i, (k, v) in enumerate(copies):
            conn.write_layer(torch.stack((k, v)), caches[i], slot_mapping=slots)
        conn.wait_writes()

    t_write = timed(write, dev, args.reps)
    return {"load_ms": t_load * 1e3, "compute_ms": t_compute * 1e3, "write_ms": t_write * 1e3}


def profile(fn, dev: torch.device, path: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    fn()
    with torch_profile(activities=acts) as prof:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    with contextlib.suppress(Exception):
        prof.export_chrome_trace(str(Path(path).with_suffix(".trace.json")))


if __name__ == "__main__":
    sys.exit(main())
