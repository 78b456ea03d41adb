"""PD test helpers: a small engine on either side of disaggregated prefill, and the decoder
run in its own (spawned) process, driven over a multiprocessing Pipe."""

from __future__ import annotations

import socket

import torch

L, H, D, C, N, BLOCKS = 2, 2, 64, 16, 8, 12  # layers, kv heads, head size, chunk, block, blocks
DTYPE = torch.float32
SHAPE = (BLOCKS, H, N, 2 * D)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def build_engine(deployment: str, init_port: int, alloc_port: int, buffer_chunks: int,
                 extra: tuple = ()):
    """(container, engine) of one PD side; the buffer holds ``buffer_chunks`` full chunks."""
    from lmcache.config import compose_config
    from lmcache.containers import build_worker_container
    from lmcache.gpu_connector.kv_layout import KVCacheLayout
    from lmcache.metadata import LMCacheMetadata

    chunk_bytes = 2 * L * C * H * D * 4 + 256
    cfg = compose_config([
        f"deployment={deployment}", f"chunk_size={C}",
        f"max_local_cpu_size={buffer_chunks * chunk_bytes / 2**30!r}",
        f"storage.backends.pd.pd_peer_init_port={init_port}",
        f"storage.backends.pd.pd_peer_alloc_port={alloc_port}",
        "storage.backends.pd.pd_allocation_timeout_sec=0.5",
        "storage.backends.pd.pd_request_timeout_sec=2.0", *extra])
    meta = LMCacheMetadata("lmcache/pd-test", 1, 0, DTYPE, (L, 2, C, H, D))
    container = build_worker_container(cfg, meta, KVCacheLayout("cpu_packed", block_size=N,
                                                               num_kv_heads=H, head_size=D))
    return container, container.engine()


def request(seed: int, num_tokens: int):
    """(tokens, kv caches, slot_mapping) of one prompt; slots start at block 1."""
    g = torch.Generator().manual_seed(seed)
    kv = [torch.randn(SHAPE, generator=g, dtype=DTYPE) for _ in range(L)]
    tokens = torch.randint(0, 30000, (num_tokens,), generator=g)
    return tokens, kv, torch.arange(N, N + num_tokens)


def serve_decoder(conn, init_port: int, alloc_port: int, buffer_chunks: int) -> None:
    from lmcache.containers import shutdown

    container, engine = build_engine("pd_decoder", init_port, alloc_port, buffer_chunks)
    backend = container.backends()[0]
    conn.send("ready")
    while True:
        cmd = conn.recv()
        op = cmd[0]
        if op == "lookup":  # (seed, n, pin) -> hit tokens
            tokens, _, _ = request(cmd[1], cmd[2])
            conn.send(engine.lookup(tokens, pin=cmd[3], lookup_id=f"pin-{cmd[1]}" if cmd[3] else None))
        elif op == "unpin":
            engine.lookup_unpin(f"pin-{cmd[1]}")
            conn.send(None)
        elif op == "retrieve":  # (seed, n) -> (tokens loaded, KV of the loaded slots exact)
            tokens, kv, slots = request(cmd[1], cmd[2])
            out = [torch.zeros(SHAPE, dtype=DTYPE) for _ in range(L)]
            ret = engine.retrieve(tokens, kvcaches=out, slot_mapping=slots)
            got = int(ret.sum())
            blocks = slice(1, 1 + -(-got // N))
            exact = all(torch.equal(o[blocks], k[blocks])
                        for o, k in zip(out, kv)) if got == cmd[2] else None
            conn.send((got, exact))
        elif op == "stats":
            conn.send(backend.stats)
        elif op == "stop":
            shutdown(container)
            conn.send(None)
            return
