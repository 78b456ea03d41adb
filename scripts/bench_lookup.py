#!/usr/bin/env python3
"""CPU-side benchmark (issue 14): lookup of long prompts, and the CPU paged KV copy.

Table 1 — ``LMCacheEngine.lookup`` of a prompt whose every chunk is in the CPU tier (full hit),
chunk 256, sha256_cbor, for each --tokens length:

  hash, per chunk (before)  the chain hashed chunk by chunk with ``cbor2`` (the former path)
  hash, vectorised          ``ChunkedTokenDatabase.process_tokens`` (one numpy CBOR encoding of
                            all tokens, one SHA-256 per chunk; keys included)
  lookup, cold              ``engine.lookup(tokens)``: hashing included, no request id
  lookup, request cached    ``engine.lookup(tokens, lookup_id=...)`` again for the same request
                            (vLLM's scheduler asks for a waiting request at every step; its
                            retrieve and store reuse the hashes too)

Table 2 — the CPU paged copy of vLLM's CPU attention pages (``cpu_packed`` with the page_map of
its ``vec`` ISA: K dim-major ``[D, N]``, V token-major), gather (store) and scatter (retrieve) of
--copy-tokens tokens of the trained tiny Llama's shape (4 layers, 2 KV heads, head size 64),
against a plain ``copy_`` of the same bytes (the ceiling on this machine):

  element path   every element through an index (the former path)
  row path       token-major halves as D-element rows, dim-major halves as whole half-pages
                 transposed in memory (``kv_transfer._PagePlan``)
  no page_map    the plain ``[2N, D]`` page order (rows), for reference

Median of --reps after one warm-up, milliseconds. Run it alone (the 2-core machine is shared:
``flock /tmp/heavy.lock``).

Usage: python scripts/bench_lookup.py [--tokens 8192 32768 131072] [--reps 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector import kv_transfer
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase
from lmcache.token_database.hashing import make_hash_fn

CHUNK = 256


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def lookup_rows(lengths: list[int], reps: int) -> list[dict]:
    # a tiny KV shape: lookup time does not depend on it, memory stays small
    meta = LMCacheMetadata("bench/lookup", 1, 0, torch.bfloat16, (1, 2, CHUNK, 1, 8))
    layout = KVCacheLayout("cpu_packed", 16, 1, 8)
    longest = max(lengths)
    alloc = CPUMemoryAllocator(longest * 2 * 8 * 2 * 2 + (16 << 20))
    backend = LocalCPUBackend(alloc, LRUCachePolicy(), max_local_cpu_size=1.0)
    db = ChunkedTokenDatabase(meta, CHUNK)
    engine = LMCacheEngine(meta, db, VLLMPagedMemGPUConnectorV2(meta, layout, backend="torch"),
                           StorageManager([backend]))
    cache = [torch.randn(longest // 16 + 1, 1, 16, 16).to(torch.bfloat16)]
    slots = torch.arange(longest)
    rows = []
    hash_fn = make_hash_fn("sha256_cbor")
    for n in lengths:
        ids = torch.randint(0, 128000, (n,), generator=torch.Generator().manual_seed(n))
        engine.clear()
        assert engine.store(ids, kvcaches=cache, slot_mapping=slots[:n]) == n

        def per_chunk():
            toks, parent = ids.tolist(), db.none_hash
            for s in range(0, n, CHUNK):
                parent = hash_fn((parent, tuple(toks[s:s + CHUNK]), ()))

        row = {"tokens": n, "chunks": n // CHUNK,
               "hash_per_chunk_ms": median_ms(per_chunk, reps),
               "hash_vectorised_ms": median_ms(lambda: list(db.process_tokens(ids)), reps),
               "lookup_cold_ms": median_ms(lambda: engine.lookup(ids), reps)}
        assert engine.lookup(ids) == n
        rid = f"req-{n}"
        t0 = time.perf_counter()
        assert engine.lookup(ids, lookup_id=rid) == n
        row["lookup_first_with_id_ms"] = (time.perf_counter() - t0) * 1e3
        row["lookup_cached_ms"] = median_ms(lambda: engine.lookup(ids, lookup_id=rid), reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    engine.close()
    return rows


def copy_rows(tokens: int, reps: int) -> list[dict]:
    layers, heads, size = 4, 2, 64
    rows = []
    for block, dtype in ((16, torch.float32), (128, torch.float32), (16, torch.bfloat16)):
        o, e = torch.arange(block)[:, None], torch.arange(size)[None, :]
        vec = torch.stack([e * block + o, block * size + o * size + e]).to(torch.int64)
        with_map = KVCacheLayout("cpu_packed", block, heads, size, page_map=vec)
        plain = KVCacheLayout("cpu_packed", block, heads, size)
        blocks = tokens // block + 8
        gen = torch.Generator().manual_seed(block)
        kv = [torch.randn(blocks, heads, block, 2 * size, generator=gen).to(dtype)
              for _ in range(layers)]
        order = torch.randperm(blocks - 1, generator=gen)[: tokens // block] + 1
        slots = (order[:, None] * block + torch.arange(block)).flatten()
        out = kv_transfer.gather_kv(kv, slots, with_map)
        nbytes = out.numel() * out.element_size()
        idx = kv_transfer._page_map_index(slots, with_map)

        def element_gather():  # the former page_map path
            for layer, t in enumerate(kv):
                flat = t.view(-1)
                for half in range(2):
                    out[half, layer].copy_(flat.index_select(0, idx[half].reshape(-1))
                                           .view(tokens, heads * size))

        def element_scatter():
            for layer, t in enumerate(kv):
                flat = t.view(-1)
                for half in range(2):
                    flat.index_copy_(0, idx[half].reshape(-1), out[half, layer].reshape(-1))

        src = out.clone()
        row = {"block_size": block, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
               "MiB": nbytes / 2**20,
               "copy_ceiling_ms": median_ms(lambda: out.copy_(src), reps),
               "element_gather_ms": median_ms(element_gather, reps),
               "element_scatter_ms": median_ms(element_scatter, reps),
               "row_gather_ms": median_ms(lambda: kv_transfer.gather_kv(kv, slots, with_map,
                                                                        out=out), reps),
               "row_scatter_ms": median_ms(lambda: kv_transfer.scatter_kv(kv, slots, with_map,
                                                                          out), reps),
               "plain_gather_ms": median_ms(lambda: kv_transfer.gather_kv(kv, slots, plain,
                                                                          out=out), reps),
               "plain_scatter_ms": median_ms(lambda: kv_transfer.scatter_kv(kv, slots, plain,
                                                                            out), reps)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def engine_rows(lengths: list[int], reps: int) -> list[dict]:
    """LMCacheEngine store (a new prompt: the no-reuse cost) and retrieve (a full hit) on CPU
    paged caches of the tiny Llama shape (float32, 4 layers, 2 KV heads x 64, vLLM CPU ``vec``
    pages, block 16), chunk 256, against a plain ``copy_`` of the same bytes."""
    layers, heads, size, block = 4, 2, 64, 16
    dtype = torch.float32
    meta = LMCacheMetadata("bench/tiny", 1, 0, dtype, (layers, 2, CHUNK, heads, size))
    o, e = torch.arange(block)[:, None], torch.arange(size)[None, :]
    vec = torch.stack([e * block + o, block * size + o * size + e]).to(torch.int64)
    layout = KVCacheLayout("cpu_packed", block, heads, size, page_map=vec)
    longest = max(lengths)
    per_token = 2 * layers * heads * size * 4
    alloc = CPUMemoryAllocator(longest * per_token * 2 + (16 << 20))
    engine = LMCacheEngine(meta, ChunkedTokenDatabase(meta, CHUNK),
                           VLLMPagedMemGPUConnectorV2(meta, layout, backend="torch"),
                           StorageManager([LocalCPUBackend(alloc, LRUCachePolicy(),
                                                           max_local_cpu_size=1.0)]))
    blocks = 2 * longest // block + 8
    gen = torch.Generator().manual_seed(1)
    kv = [torch.randn(blocks, heads, block, 2 * size, generator=gen) for _ in range(layers)]
    rows = []
    for n in lengths:
        ids = torch.randint(0, 128000, (n,), generator=gen)
        perm = torch.randperm(blocks - 1, generator=gen) + 1
        src = (perm[: -(-n // block)][:, None] * block + torch.arange(block)).flatten()[:n]
        dst = (perm[-(-n // block):][: -(-n // block)][:, None] * block
               + torch.arange(block)).flatten()[:n]
        stored = n - n % CHUNK

        def store():
            engine.clear()
            assert engine.store(ids, kvcaches=kv, slot_mapping=src) == stored

        def retrieve():
            assert int(engine.retrieve(ids, kvcaches=kv, slot_mapping=dst).sum()) == stored

        store()
        a = torch.empty(stored * per_token // 4)
        b = torch.randn(stored * per_token // 4)
        row = {"tokens": n, "stored": stored, "MiB": stored * per_token / 2**20,
               "copy_ceiling_ms": median_ms(lambda: a.copy_(b), reps),
               "store_ms": median_ms(store, reps),
               "retrieve_ms": median_ms(retrieve, reps)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    engine.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--copy-tokens", type=int, default=8192)
    ap.add_argument("--engine-tokens", type=int, nargs="+", default=[1714, 8192])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core host a 2-thread "
                         "op waits for a descheduled thread, ~8 ms per op)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["lookup", "copy", "engine"])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    result = {"torch_threads": torch.get_num_threads(),
              "lookup": [] if "lookup" in args.skip else lookup_rows(args.tokens, args.reps),
              "copy": [] if "copy" in args.skip else copy_rows(args.copy_tokens, args.reps),
              "engine": [] if "engine" in args.skip else engine_rows(args.engine_tokens,
                                                                     args.reps)}
    print("\n| tokens | chunks | hash per chunk (before) | hash vectorised | lookup cold "
          "(hash included) | lookup, request cached |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in result["lookup"]:
        print(f"| {r['tokens']} | {r['chunks']} | {r['hash_per_chunk_ms']:.1f} ms | "
              f"{r['hash_vectorised_ms']:.1f} ms | {r['lookup_cold_ms']:.1f} ms | "
              f"{r['lookup_cached_ms']:.2f} ms |")
    print("\n| block, dtype | MiB | copy_ ceiling | gather: element / row / no map | "
          "scatter: element / row / no map |")
    print("|---|---:|---:|---:|---:|")
    for r in result["copy"]:
        print(f"| {r['block_size']}, {r['dtype']} | {r['MiB']:.0f} | {r['copy_ceiling_ms']:.1f} ms"
              f" | {r['element_gather_ms']:.1f} / {r['row_gather_ms']:.1f} / "
              f"{r['plain_gather_ms']:.1f} ms | {r['element_scatter_ms']:.1f} / "
              f"{r['row_scatter_ms']:.1f} / {r['plain_scatter_ms']:.1f} ms |")
    print("\n| tokens (stored) | MiB | copy_ ceiling | engine store (new prompt) | engine "
          "retrieve (full hit) |")
    print("|---:|---:|---:|---:|---:|")
    for r in result["engine"]:
        print(f"| {r['tokens']} ({r['stored']}) | {r['MiB']:.1f} | {r['copy_ceiling_ms']:.1f} ms | "
              f"{r['store_ms']:.1f} ms ({r['copy_ceiling_ms'] / r['store_ms']:.0%}) | "
              f"{r['retrieve_ms']:.1f} ms ({r['copy_ceiling_ms'] / r['retrieve_ms']:.0%}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
