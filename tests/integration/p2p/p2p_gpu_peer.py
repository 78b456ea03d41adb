"""An instance of the P2P tier over CUDA IPC for tests/integration/p2p/test_p2p_cuda_ipc.py:
the worker graph of ``allocator=gpu transfer_channel=cuda_ipc deployment=p2p`` built by the
container (no vLLM, no engine: the tiers only), and a peer process holding chunks in its
GPU-resident CPU tier, driven over a multiprocessing Pipe."""

from __future__ import annotations

import torch

from lmcache.config import compose_config
from lmcache.containers import build_worker_container
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata

L, H, D, C = 2, 2, 8, 16  # layers, kv heads, head size, chunk size
DTYPE = torch.float32
SHAPE = (2, L, C, H * D)  # one chunk, KV_2LTD


def metadata() -> LMCacheMetadata:
    return LMCacheMetadata("lmcache/p2p-gpu-test", 1, 0, DTYPE, (L, 2, C, H, D))


def keys(n: int) -> list[CacheEngineKey]:
    return [CacheEngineKey("lmcache/p2p-gpu-test", 1, 0, 0x5000 + i, DTYPE) for i in range(n)]


def chunk(i: int) -> torch.Tensor:
    """The KV of chunk ``i`` (CPU, a pure function of i: both processes agree)."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(SHAPE, generator=g, dtype=DTYPE)


def overrides(instance_id: str, reply_port: int, timeout: float = 3.0) -> list[str]:
    return ["deployment=p2p", "allocator=gpu", "transfer_channel=cuda_ipc", f"chunk_size={C}",
            "max_local_cpu_size=0.01", f"lmcache_instance_id={instance_id}",
            "controller_pull_url=127.0.0.1:9", f"controller_reply_url=127.0.0.1:{reply_port}",
            "lmcache_worker_ports=[0]", "p2p_host=127.0.0.1", "p2p_init_ports=[0]",
            "p2p_lookup_ports=[0]", f"storage.backends.p2p.blocking_timeout_secs={timeout}",
            "storage.backends.p2p.lookup_timeout_secs=2.0",
            "storage.backends.p2p.lookup_cache_secs=0.0"]


def build(instance_id: str, reply_port: int):
    """(container, [LocalCPUBackend, P2PBackend]) of one instance."""
    cfg = compose_config(overrides(instance_id, reply_port))
    layout = KVCacheLayout("cpu_packed", block_size=C, num_kv_heads=H, head_size=D)
    container = build_worker_container(cfg, metadata(), layout)
    return container, container.backends()


def serve(conn, reply_port: int, n: int) -> None:
    """Peer A: n chunks in its CPU tier (GPU memory); sends ("ready", peer_init_url, device
    of its buffer, channel kind), then answers ("quit",)."""
    from lmcache.containers import shutdown

    container, (cpu, p2p) = build("A", reply_port)
    for i, key in enumerate(keys(n)):
        obj = cpu.allocate(list(SHAPE), DTYPE, MemoryFormat.KV_2LTD)
        obj.tensor.copy_(chunk(i))
        cpu.put(key, obj)
        obj.ref_count_down()
    torch.cuda.synchronize()
    conn.send(("ready", p2p.peer_init_url, str(cpu.allocator.buffer.device), p2p.channel.kind))
    conn.recv()
    shutdown(container)
    conn.send("bye")
