"""GPUCacheContext: the KV caches one engine instance registered with the MP server."""

from __future__ import annotations

import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.v1.multiprocess.custom_types import CudaIPCWrapper


def layout_of(tensor: torch.Tensor) -> KVCacheLayout:
    """The KVCacheLayout of one registered layer tensor.

    ``[2, B, N, H, D]`` → legacy_5d; ``[B, H, N, 2D]`` → flash_packed on CUDA (vLLM's
    FlashAttention / Triton layout), cpu_packed on CPU (plain K-then-V page order); ``[B, N, C]``
    → mla. Raises ValueError for any other shape.
    """
    shape = tuple(tensor.shape)
    if len(shape) == 5 and shape[0] == 2:
        return KVCacheLayout("legacy_5d", block_size=shape[2], num_kv_heads=shape[3], head_size=shape[4])
    if len(shape) == 4 and shape[3] % 2 == 0:
        kind = "flash_packed" if tensor.is_cuda else "cpu_packed"
        return KVCacheLayout(kind, block_size=shape[2], num_kv_heads=shape[1], head_size=shape[3] // 2)
    if len(shape) == 3:
        return KVCacheLayout("mla", block_size=shape[1], num_kv_heads=1, head_size=shape[2])
    raise ValueError(f"registered KV cache layer of shape {shape}: expected [2, B, N, H, D], "
                     "[B, H, N, 2*D] or MLA [B, N, C]")


class GPUCacheContext:
    """The opened KV caches of one engine instance (one vLLM worker process).

    Args:
        instance_id: the instance's id (vLLM's adapter sends its worker pid).
        wrappers: one CudaIPCWrapper per layer, in layer order.

    Attributes:
        kv_caches: the opened per-layer tensors (writes reach the instance's memory).
        layout: their KVCacheLayout (all layers alike); dtype, device, block_size, num_layers.

    Raises:
        ValueError: no layers, layers of different shapes/dtypes, or an unknown layout.
        RuntimeError / TypeError: a handle that cannot be opened here.
    """

    def __init__(self, instance_id: int, wrappers: list[CudaIPCWrapper]) -> None:
        if not isinstance(wrappers, (list, tuple)) or not wrappers:
            raise ValueError(f"instance {instance_id} registered no KV cache layers")
        for i, w in enumerate(wrappers):
            if not isinstance(w, CudaIPCWrapper):
                raise TypeError(f"KV cache layer {i} of instance {instance_id} is a "
                                f"{type(w).__name__}, expected CudaIPCWrapper")
        first = wrappers[0]
        for i, w in enumerate(wrappers):
            if (w.shape, w.dtype) != (first.shape, first.dtype):
                raise ValueError(f"instance {instance_id}: layer {i} is {w.dtype} {w.shape}, "
                                 f"layer 0 is {first.dtype} {first.shape}")
        self.instance_id = instance_id
        self.kv_caches = [w.to_tensor() for w in wrappers]
        self.layout = layout_of(self.kv_caches[0])
        self.dtype = self.kv_caches[0].dtype
        self.device = self.kv_caches[0].device
        self.num_layers = len(self.kv_caches)
        self.block_size = self.layout.block_size
        self.num_blocks = self.layout.num_blocks(self.kv_caches[0])

    def slots(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        """int64 CPU slots of ``num_tokens`` tokens laid out over ``block_ids`` in order.

        Raises:
            ValueError: too few blocks for ``num_tokens``, or a block id outside the cache.
        """
        n = self.block_size
        need = -(-num_tokens // n)
        if len(block_ids) < need:
            raise ValueError(f"{num_tokens} tokens need {need} blocks of {n}, got {len(block_ids)}")
        blocks = torch.tensor(block_ids[:need], dtype=torch.int64)
        if need and not (
                0 <= int(blocks.min()) and int(blocks.max()) < self.num_blocks):
            raise ValueError(f"block ids outside [0, {self.num_blocks}) of instance "
                             f"{self.instance_id}: {block_ids[:need]}")
        return (blocks[:, None] * n + torch.arange(n)).flatten()[:num_tokens]

    def close(self) -> None:
        """Drop the opened tensors (the IPC mappings go with the last reference)."""
        self.kv_caches = []
