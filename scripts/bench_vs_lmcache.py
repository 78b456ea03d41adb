#!/usr/bin/env python3
"""Peer benchmark on one GPU: lmcache (this tree) against real LMCache, same process, same KV.

Both engines store and retrieve the same Llama-3-8B-shaped paged KV cache (32 layers, 8 KV heads,
head size 128, bf16, block size 16, vLLM's blocks-first packed layout ``[num_blocks, H, N, 2*D]``
— lmcache's ``flash_packed``, LMCache's ``NL_X_NB_NH_BS_CS`` with ``kv_layout=HND``; blocks
scattered at random), chunk size 256, a CPU tier of pinned memory (LMCache: LocalCPUBackend of
its MixedMemoryAllocator; lmcache: LocalCPUBackend of CPUMemoryAllocator), GPU connectors as
vLLM builds them (LMCache: ``CreateGPUConnector(..., EngineType.VLLM, {"kv_layout": "HND"})``;
lmcache: VLLMPagedMemGPUConnectorV2, transfer=dma).

For every size and engine, in this order: store the tokens' KV from slots A, retrieve it into
slots B, and check that B's bytes equal A's in every layer (a failed check is reported in the
row, never hidden). Two call modes:

  sync    ``torch.cuda.synchronize()`` right before the call (what a micro-benchmark usually does)
  nosync  the KV is (re)written on the compute stream by a kernel just before the call, no sync
          (what vLLM does: the forward pass writes the KV, the connector stores it right after;
          for retrieve the target pages were zeroed on the compute stream just before)

and a race probe per direction: the compute stream sleeps ~50 ms (``torch.cuda._sleep``) and then
writes the KV (store) or zeroes the target pages (retrieve), no sync, and the call runs at once;
the bytes are checked after. An engine that copies on its own stream without waiting for the
compute stream reads stale KV there (store) or has its load overwritten (retrieve).

Times are wall clock per call (median of --reps, the device synchronized after the call), in
GB/s of KV and as a fraction of the pinned ``copy_`` ceiling measured in the same process.

How LMCache is loaded: its wheel is installed into its own folder (``--lmcache-path``, e.g.
``pip install --no-deps --target /tmp/lmc053 lmcache-0.5.3-...whl``). Both packages are named
``lmcache``, so the script imports LMCache with its modules swapped into ``sys.modules`` (and
its folder first on ``sys.path``), keeps them aside, and swaps them in around every LMCache call
(imports inside LMCache functions then resolve to LMCache). Optional modules LMCache imports at
module level for features not used here and that the machine lacks (numba, aiohttp) are
replaced by inert stubs, listed in the output.

Usage: PYTHONPATH=src python scripts/bench_vs_lmcache.py --lmcache-path /tmp/lmc053
       [--tokens 1024 8192 16384 32768] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.util
import json
import os
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import BYTES_PER_TOKEN, CHUNK, DTYPE, D, H, L, N, Setup, ceiling, device_info  # noqa: E402

from lmcache.gpu_connector.kv_transfer import gather_kv  # noqa: E402

STUB_MODULES = ("numba", "llvmlite", "aiohttp", "aiofile")  # module-level imports of unused features


class _Inert:
    """Stands for any attribute of a stubbed module; as a decorator it returns the function."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, key: str) -> "_Inert":
        if key.startswith("__"):
            raise AttributeError(key)
        return _Inert(f"{self._name}.{key}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], _Inert):
            return args[0]
        return _Inert(f"{self._name}()")

    def __mro_entries__(self, bases):
        return (object,)


def _stub_attr(module: str, key: str) -> _Inert:
    if key.startswith("__"):  # __file__, __spec__...: absent, as Python's tools expect
        raise AttributeError(key)
    return _Inert(f"{module}.{key}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: a module of STUB_MODULES that is not installed becomes a stub."""

    def __init__(self) -> None:
        self.stubbed: list[str] = []

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in STUB_MODULES:
            return None
        if name not in self.stubbed:
            self.stubbed.append(name)
        return importlib.util.spec_from_loader(name, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda key, n=spec.name: _stub_attr(n, key)
        return module

    def exec_module(self, module):
        pass


def _is_pkg_module(name: str, pkg: str = "lmcache") -> bool:
    return name == pkg or name.startswith(pkg + ".")


class RealLMCache:
    """LMCache (a different package also named ``lmcache``) loaded beside this tree's lmcache."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        if not os.path.isdir(os.path.join(self.path, "lmcache", "v1")):
            raise FileNotFoundError(f"{self.path}/lmcache/v1 not found: install LMCache's wheel "
                                    f"there with pip install --no-deps --target {self.path}")
        os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
        os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
        self.finder = _StubFinder()
        self.modules: dict[str, types.ModuleType] = {}
        with self.active():
            import lmcache as lmc  # noqa: F401  (LMCache's)
            from lmcache.v1.cache_engine import LMCacheEngineBuilder
            from lmcache.v1.config import LMCacheEngineConfig
            from lmcache.v1.gpu_connector import CreateGPUConnector
            from lmcache.v1.metadata import LMCacheMetadata
            from lmcache.utils import EngineType

            self.version = getattr(lmc, "__version__", "?")
            self.file = lmc.__file__
            self.api = types.SimpleNamespace(
                Builder=LMCacheEngineBuilder, Config=LMCacheEngineConfig,
                CreateGPUConnector=CreateGPUConnector, Metadata=LMCacheMetadata,
                EngineType=EngineType)

    @contextlib.contextmanager
    def active(self):
        """LMCache's modules in sys.modules (and its folder on sys.path) inside the block."""
        ours = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _is_pkg_module(k)]}
        sys.modules.update(self.modules)
        sys.path.insert(0, self.path)
        sys.meta_path.append(self.finder)
        try:
            yield
        finally:
            sys.meta_path.remove(self.finder)
            sys.path.remove(self.path)
            self.modules = {k: sys.modules.pop(k) for k in [k for k in sys.modules
                                                             if _is_pkg_module(k)]}
            sys.modules.update(ours)

    def make_engine(self, tokens: int, instance: str):
        api = self.api
        with self.active():
            gib = tokens * BYTES_PER_TOKEN * 1.25 / 2**30 + 0.5
            config = api.Config.from_defaults(chunk_size=CHUNK, local_cpu=True,
                                              max_local_cpu_size=gib)
            meta = api.Metadata(model_name="bench/llama-3-8b", world_size=1, local_world_size=1,
                                worker_id=0, local_worker_id=0, kv_dtype=DTYPE,
                                kv_shape=(L, 2, CHUNK, H, D))
            conn = api.CreateGPUConnector(config, meta, api.EngineType.VLLM,
                                          layout_hints={"kv_layout": "HND"})
            engine = api.Builder.get_or_create(instance, config, meta, conn,
                                               lambda t, r: None, lambda o, r: o)
            engine.post_init()
        return engine


class Side:
    """One engine under test: store / retrieve / clear, run in its own module context."""

    def __init__(self, name, engine, context) -> None:
        self.name, self.engine, self.context = name, engine, context

    def store(self, ids, slots):
        with self.context():
            self.engine.store(ids, kvcaches=self.kv, slot_mapping=slots)

    def wait_stored(self, ids, tokens: int, timeout: float = 10.0) -> float:
        """Untimed: until a lookup sees every chunk (a store may hand chunks to its tier
        asynchronously); returns the seconds waited."""
        t0 = time.perf_counter()
        with self.context():
            while self.engine.lookup(ids) < tokens and time.perf_counter() - t0 < timeout:
                time.sleep(0.001)
        return time.perf_counter() - t0

    def retrieve(self, ids, slots) -> int:
        with self.context():
            return int(self.engine.retrieve(ids, kvcaches=self.kv, slot_mapping=slots).sum())

    def clear(self):
        with self.context():
            self.engine.clear()


def run_size(s: Setup, side: Side, tokens: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, 128000, (tokens,), generator=gen)
    # disjoint random blocks for the source and the target (block 0 never used)
    blocks = torch.randperm(s.num_blocks - 1, generator=gen) + 1
    need = -(-tokens // N)
    src, dst = ((b[:, None] * N + torch.arange(N)).flatten()[:tokens].cuda()
                for b in (blocks[:need], blocks[need:2 * need]))
    layer_rows = [t for t in s.kv]  # the paged tensors (shared by both engines)
    nbytes = tokens * BYTES_PER_TOKEN
    out = {"tokens": tokens}

    def expected():
        return gather_kv(layer_rows, src, s.layout)

    def check() -> bool:
        torch.cuda.synchronize()
        return bool(torch.equal(gather_kv(layer_rows, dst, s.layout), expected()))

    def write_kv(seed: int):  # the forward pass writing this request's KV (compute stream)
        g = torch.Generator(device="cuda").manual_seed(seed)
        for t in layer_rows:
            view = t.view(-1, H, N, 2 * D)
            view[src.div(N, rounding_mode="floor").unique()] = torch.randn(
                src.div(N, rounding_mode="floor").unique().numel(), H, N, 2 * D,
                generator=g, device="cuda", dtype=DTYPE)

    def zero_dst():
        for t in layer_rows:
            t.view(-1, H, N, 2 * D)[dst.div(N, rounding_mode="floor").unique()] = 0

    got_min, waited = tokens, 0.0
    for mode in ("sync", "nosync"):
        st, rt, ok = [], [], True
        for rep in range(reps + 1):
            side.clear()
            if mode == "sync":
                torch.cuda.synchronize()
            else:
                write_kv(rep)
            t0 = time.perf_counter()
            side.store(ids, src)
            torch.cuda.synchronize()
            st.append(time.perf_counter() - t0)
            waited = max(waited, side.wait_stored(ids, tokens))
            if mode == "sync":
                torch.cuda.synchronize()
            else:
                zero_dst()
            t0 = time.perf_counter()
            got = side.retrieve(ids, dst)
            torch.cuda.synchronize()
            rt.append(time.perf_counter() - t0)
            got_min = min(got_min, got)
            ok = ok and got == tokens and check()
        out[f"store_{mode}_s"] = statistics.median(st[1:])
        out[f"retrieve_{mode}_s"] = statistics.median(rt[1:])
        out[f"store_{mode}_GBps"] = nbytes / out[f"store_{mode}_s"] / 1e9
        out[f"retrieve_{mode}_GBps"] = nbytes / out[f"retrieve_{mode}_s"] / 1e9
        out[f"bytes_ok_{mode}"] = ok
    out["retrieved_min"], out["store_wait_max_s"] = got_min, waited
    # race probes: a long kernel on the compute stream right before the call, no sync
    side.clear()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # ~50 ms at H200 clocks
    write_kv(1234)
    side.store(ids, src)
    torch.cuda.synchronize()
    side.wait_stored(ids, tokens)
    side.retrieve(ids, dst)
    out["race_store_ok"] = check()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)
    zero_dst()
    got = side.retrieve(ids, dst)
    out["race_retrieve_ok"] = got == tokens and check()
    side.clear()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lmcache-path", required=True, help="folder LMCache's wheel is installed in")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 16384, 32768])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="write all numbers to this file")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    from bench_gpu import make_engine

    result: dict = {"device": device_info(), "rows": []}
    real = RealLMCache(args.lmcache_path)
    result["lmcache_peer"] = {"version": real.version, "file": real.file,
                              "stubbed_modules": real.finder.stubbed}
    print(json.dumps(result), flush=True)
    s = Setup(max(args.tokens), spare_blocks=max(args.tokens) // N + 256)  # room for 2 sets
    ours = Side("lmcache", make_engine(s, "dma"), contextlib.nullcontext)
    ours.kv = s.kv
    peer = Side(f"LMCache {real.version}", real.make_engine(max(args.tokens), "bench"),
                real.active)
    peer.kv = s.kv
    for tokens in args.tokens:
        h2d, d2h = ceiling(tokens, args.reps)
        for side in (ours, peer):
            try:
                row = run_size(s, side, tokens, args.reps)
            except Exception as err:  # report the failure in the table, keep going
                row = {"tokens": tokens, "error": f"{type(err).__name__}: {err}"}
            row.update(engine=side.name, ceil_h2d=h2d, ceil_d2h=d2h)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # kept up to date: a run cut short still leaves its rows
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    sys.stdout.flush()
    os._exit(0)  # LMCache's engine leaves non-daemon threads running


def print_table(result: dict) -> None:
    print("\nGB/s (fraction of the pinned copy_ ceiling: store D2H, retrieve H2D); ok = bytes "
          "of every layer equal after store + retrieve; race = after a 50 ms compute kernel "
          "wrote the KV (store) / zeroed the target pages (retrieve) just before the call")
    print("| tokens | engine | store sync | store nosync | retrieve sync | retrieve nosync | "
          "bytes ok sync/nosync | race store/retrieve |")
    print("|---:|---|---:|---:|---:|---:|---|---|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['tokens']} | {r['engine']} | error: {r['error'][:120]} |||||| ")
            continue
        cells = []
        for op, ceil in (("store", "ceil_d2h"), ("retrieve", "ceil_h2d")):
            for mode in ("sync", "nosync"):
                gbps = r[f"{op}_{mode}_GBps"]
                cells.append(f"{gbps:.1f} ({gbps * 1e9 / r[ceil]:.0%})")
        ok = "/".join("yes" if r[f"bytes_ok_{m}"] else "NO" for m in ("sync", "nosync"))
        race = "/".join("ok" if r[k] else "WRONG" for k in ("race_store_ok", "race_retrieve_ok"))
        if r.get("retrieved_min", r["tokens"]) < r["tokens"]:
            ok += f" (retrieved only {r['retrieved_min']})"
        print(f"| {r['tokens']} | {r['engine']} | {cells[0]} | {cells[1]} | {cells[2]} | "
              f"{cells[3]} | {ok} | {race} |")
    by = {}
    for r in result["rows"]:
        if "error" not in r:
            by.setdefault(r["tokens"], {})[r["engine"].split()[0]] = r
    print("\nlmcache speed-up over LMCache (time ratio), sync / nosync:")
    for tokens, pair in by.items():
        if len(pair) == 2:
            a, b = pair["lmcache"], pair["LMCache"]
            parts = [f"{op} {b[f'{op}_{m}_s'] / a[f'{op}_{m}_s']:.2f}x"
                     for op in ("store", "retrieve") for m in ("sync", "nosync")]
            print(f"  {tokens:>6}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
