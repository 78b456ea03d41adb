"""One lmcache "instance" as its own process, for the controller / P2P tests.

``python instance.py '<json list of Hydra overrides>'`` builds the worker graph (real tiers, real
transfer channel, real LMCacheWorker) for a small test model and answers JSON commands, one
per line on stdin, one JSON reply per line on stdout:

* ``{"cmd": "store", "seed": s, "chunks": n}`` — store n chunks of the tokens/KV of seed s;
* ``{"cmd": "retrieve", "seed": s, "chunks": n}`` — retrieve into a zeroed paged cache:
  ``{"tokens": loaded, "exact": loaded KV == seed s's KV, "zeros_elsewhere": bool}``;
* ``{"cmd": "lookup", "seed": s, "chunks": n}``, ``{"cmd": "stats"}``, ``{"cmd": "clear_cpu"}``,
  ``{"cmd": "quit"}``;
* ``{"cmd": "pause_before_read", "path": p}`` — the next P2P pull stops after the peer acquired
  the chunks, creates ``p.reached`` and waits until the file ``p`` exists (fault tests kill
  the peer there).

KV and tokens of a seed are a pure function of the seed, so two processes agree on them.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from lmcache.config import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.metadata import LMCacheMetadata

L, H, D, C, N = 2, 2, 8, 16, 16  # layers, kv heads, head size, chunk, block size
BLOCKS = 40
DTYPE = torch.float32


def metadata() -> LMCacheMetadata:
    return LMCacheMetadata("lmcache/p2p-test", 1, 0, DTYPE, (L, 2, C, H, D))


def seed_data(seed: int, chunks: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 30000, (chunks * C,), generator=gen)
    kv = [torch.randn((BLOCKS, H, N, 2 * D), generator=gen, dtype=DTYPE) for _ in range(L)]
    slots = torch.arange(N, N + chunks * C)
    return tokens, kv, slots


def main() -> None:
    overrides = json.loads(sys.argv[1])
    cfg = compose_config([f"chunk_size={C}", "max_local_cpu_size=0.02", *overrides])
    layout = KVCacheLayout("cpu_packed", block_size=N, num_kv_heads=H, head_size=D)
    container = build_worker_container(cfg, metadata(), layout)
    engine = container.engine()
    worker = container.lmcache_worker()
    tiers = container.backends()
    p2p = next((t for t in tiers if t.name == "P2PBackend"), None)
    print(json.dumps({"ready": True, "worker_port": getattr(worker, "port", None),
                      "peer_init_url": getattr(p2p, "peer_init_url", None)}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        cmd, reply = msg["cmd"], {}
        if cmd in ("store", "retrieve", "lookup"):
            tokens, kv, slots = seed_data(msg["seed"], msg["chunks"])
            if cmd == "store":
                reply["tokens"] = engine.store(tokens, kvcaches=kv, slot_mapping=slots)
            elif cmd == "lookup":
                reply["tokens"] = engine.lookup(tokens)
            else:
                out = [torch.zeros_like(t) for t in kv]
                ret = engine.retrieve(tokens, kvcaches=out, slot_mapping=slots)
                n = int(ret.sum())
                blocks = slice(1, 1 + n // N)
                reply["tokens"] = n
                reply["exact"] = all(torch.equal(o[blocks], k[blocks]) for o, k in zip(out, kv))
                reply["zeros_elsewhere"] = all(
                    int(torch.count_nonzero(o[1 + n // N:])) == 0 for o in out)
        elif cmd == "stats":
            reply = {"p2p": dict(p2p.stats) if p2p else None,
                     "worker": dict(worker.stats) if worker else None,
                     "cpu_chunks": len(tiers[0]),
                     "allocations": tiers[0].allocator.num_active_allocations,
                     "knows_peer": {u: p2p.client.knows(u) for u in msg.get("peers", [])}
                     if p2p else {}}
        elif cmd == "pause_before_read":  # the next pull waits for this file after acquiring
            path = msg["path"]

            def wait(path=path):
                open(path + ".reached", "w").close()
                while not os.path.exists(path):
                    time.sleep(0.01)
                p2p.before_read = None

            p2p.before_read = wait
        elif cmd == "clear_cpu":
            reply["cleared"] = tiers[0].clear()
        elif cmd == "quit":
            shutdown(container)
            print(json.dumps({"bye": True}), flush=True)
            return
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
