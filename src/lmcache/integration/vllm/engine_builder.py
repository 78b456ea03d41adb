"""Builds lmcache's runtime facts and component graph from a vLLM configuration.

vLLM owns the command line, so the configuration is composed with Hydra's compose API from the
installed ``lmcache.conf`` package, with LMCache's YAML (``LMCACHE_CONFIG_FILE``), ``LMCACHE_*``
environment variables and ``lmcache.*`` keys of ``kv_connector_extra_config`` translated into
overrides (see :mod:`lmcache.config.legacy`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.metadata import LMCacheMetadata


def compose_from_vllm(extra_config: Mapping[str, Any] | None):
    """The lmcache configuration (a DictConfig) for a vLLM deployment.

    Raises:
        ValueError: an unknown or invalid key in any of the three sources (the message names it).
    """
    from lmcache.config.compose import compose_config
    from lmcache.config.legacy import overrides_from_legacy

    overrides = overrides_from_legacy(os.environ.get("LMCACHE_CONFIG_FILE"), os.environ,
                                      dict(extra_config or {}))
    return compose_config(overrides)


def layout_from_vllm(kv_cache: torch.Tensor, head_size: int, use_mla: bool, is_cpu: bool) -> KVCacheLayout:
    """Describe one layer's paged KV tensor as vLLM handed it.

    Current vLLM hands each layer a view ``[num_blocks, H, block_size, C]`` (C = 2·head_size, or
    the MLA latent size with H = 1); older vLLM used ``[2, num_blocks, block_size, H, D]``. The CPU
    attention backend reads a (block, head) page ``[N, 2D]`` as ``[2N, D]`` (K rows, then V rows);
    FlashAttention/Triton split C into K = C[:D], V = C[D:] (vLLM 0.32 ``cpu_attn.py`` /
    ``flash_attn.py``).

    Raises:
        ValueError: a tensor whose shape fits none of these layouts.
    """
    if kv_cache.dim() == 5:
        if kv_cache.shape[0] != 2:
            raise ValueError(f"5-D KV cache of shape {tuple(kv_cache.shape)}: expected [2, B, N, H, D]")
        return KVCacheLayout("legacy_5d", block_size=kv_cache.shape[2], num_kv_heads=kv_cache.shape[3],
                             head_size=kv_cache.shape[4])
    if kv_cache.dim() != 4:
        raise ValueError(f"KV cache of shape {tuple(kv_cache.shape)}: expected [B, H, N, C] or [2, B, N, H, D]")
    _, heads, block_size, width = kv_cache.shape
    if use_mla:
        if heads != 1:
            raise ValueError(f"MLA KV cache of shape {tuple(kv_cache.shape)}: expected H = 1")
        return KVCacheLayout("mla", block_size=block_size, num_kv_heads=1, head_size=width)
    if width != 2 * head_size:
        raise ValueError(f"KV cache of shape {tuple(kv_cache.shape)}: expected C = 2·head_size = {2 * head_size}")
    kind = "cpu_packed" if is_cpu else "flash_packed"
    return KVCacheLayout(kind, block_size=block_size, num_kv_heads=heads, head_size=head_size)


def metadata_from_vllm(vllm_config, kv_caches: list[torch.Tensor], layout: KVCacheLayout,
                       chunk_size: int, worker_id: int) -> LMCacheMetadata:
    """LMCacheMetadata of this worker: model, tensor-parallel size and rank, kv dtype and shape."""
    model_config = vllm_config.model_config
    use_mla = layout.kind == "mla"
    return LMCacheMetadata(
        model_name=str(model_config.model),
        world_size=int(vllm_config.parallel_config.tensor_parallel_size),
        worker_id=int(worker_id),
        kv_dtype=kv_caches[0].dtype,
        kv_shape=(len(kv_caches), 1 if use_mla else 2, int(chunk_size), layout.num_kv_heads, layout.head_size),
        use_mla=use_mla,
    )
