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


OVERRIDES_KEY = "lmcache.overrides"


def compose_from_vllm(extra_config: Mapping[str, Any] | None):
    """The lmcache configuration (a DictConfig) for a vLLM deployment.

    ``kv_connector_extra_config`` may also carry lmcache's own Hydra overrides under
    ``"lmcache.overrides"`` (a list of strings, e.g. ``["deployment=cpu_disk",
    "local_disk=/nvme/kv"]``); they are applied after the LMCache keys, so they win.

    Logs the effective config once, with the source of every value that is not a default
    (:func:`lmcache.config.effective.log_effective_config`).

    Raises:
        ValueError: an unknown or invalid key in any of the sources (the message names it and
            its source), a malformed override, or ``lmcache.overrides`` that is not a list of
            strings.
    """
    from lmcache.config.compose import compose_config
    from lmcache.config.effective import log_effective_config
    from lmcache.config.legacy import legacy_overrides

    extra = dict(extra_config or {})
    native = extra.pop(OVERRIDES_KEY, None) or []
    if isinstance(native, str):
        native = [native]
    if not isinstance(native, (list, tuple)) or not all(isinstance(o, str) for o in native):
        raise ValueError(f"{OVERRIDES_KEY} must be a list of Hydra override strings, got {native!r}")
    pairs = legacy_overrides(os.environ.get("LMCACHE_CONFIG_FILE"), os.environ, extra)
    overrides = [o for o, _ in pairs] + list(native)
    sources = [s for _, s in pairs] + [f"kv_connector_extra_config[{OVERRIDES_KEY!r}]"] * len(native)
    cfg = compose_config(overrides, sources=sources)
    log_effective_config(cfg, overrides, sources)  # once per process and config
    return cfg


def probe_cpu_page_map(block_size: int, head_size: int, dtype: torch.dtype, isa: str,
                       write_fn=None) -> torch.Tensor | None:
    """Measure how vLLM's CPU cache-write kernel orders one (block, head) page.

    vLLM 0.32's CPU attention writes K and V with ``cpu_attn_reshape_and_cache`` in an order
    that depends on the kernel ISA (``vec`` stores a block's K dim-major, ``[D, N]``; V
    token-major). Rather than assume, this writes a block of tokens whose values encode
    (token, dim) in base-16 digits (exact in every float dtype, fp8 included) and reads where
    each element landed.

    Args:
        block_size, head_size: N and D of the layer.
        dtype: the KV cache dtype.
        isa: the attention ISA vLLM chose for these layers (e.g. ``"vec"``, ``"vec16"``, ``"amx"``).
        write_fn: the cache-write op (default ``vllm._custom_ops.cpu_attn_reshape_and_cache``).
    Returns:
        ``page_map`` int64 ``[2, N, D]`` (see KVCacheLayout), or None when the page is the
        plain ``[2N, D]`` order (K rows then V rows).
    Raises:
        ValueError: the kernel's page order is not a permutation (a layout lmcache cannot move).
    """
    if write_fn is None:
        from vllm import _custom_ops as ops

        write_fn = ops.cpu_attn_reshape_and_cache
    n, d = block_size, head_size
    elem = torch.arange(n * d, dtype=torch.int64)
    element_at = torch.zeros(2, n * d, dtype=torch.int64)  # element id found at each position
    for k in range(max(1, ((n * d - 1).bit_length() + 3) // 4)):
        digit = ((elem >> (4 * k)) & 15) + 1
        src = digit.to(dtype).view(n, 1, d)
        cache = torch.zeros(1, 1, 2 * n, d, dtype=dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        write_fn(src, src.clone(), key_cache, value_cache, torch.arange(n, dtype=torch.int64), isa)
        got = cache.view(2, n * d).to(torch.int64) - 1
        if bool((got < 0).any()) or bool((got > 15).any()):
            raise ValueError(f"vLLM CPU cache layout for isa {isa!r} (N={n}, D={d}, {dtype}) is not "
                             "an element permutation of the page; lmcache cannot move it")
        element_at |= got << (4 * k)
    pos_of = torch.empty_like(element_at)
    for kv in range(2):
        if not torch.equal(element_at[kv].sort().values, elem):
            raise ValueError(f"vLLM CPU cache layout for isa {isa!r} (N={n}, D={d}, {dtype}) is not "
                             "a permutation of the page; lmcache cannot move it")
        pos_of[kv, element_at[kv]] = torch.arange(n * d) + kv * n * d
    if torch.equal(pos_of.flatten(), torch.arange(2 * n * d)):
        return None
    return pos_of.view(2, n, d)


def layout_from_vllm(kv_cache: torch.Tensor, head_size: int, use_mla: bool, is_cpu: bool,
                     page_map: torch.Tensor | None = None) -> KVCacheLayout:
    """Describe one layer's paged KV tensor as vLLM handed it.

    Current vLLM hands each layer a view ``[num_blocks, H, block_size, C]`` (C = 2·head_size, or
    the MLA latent size with H = 1; lmcache views an MLA layer as ``[B, N, C]``); older vLLM used ``[2, num_blocks, block_size, H, D]``. The CPU
    attention backend reads a (block, head) page ``[N, 2D]`` as ``[2N, D]`` (K half, then V half;
    the element order inside each half is ``page_map``, see :func:`probe_cpu_page_map`);
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
    if is_cpu:
        return KVCacheLayout("cpu_packed", block_size=block_size, num_kv_heads=heads, head_size=head_size,
                             page_map=page_map)
    return KVCacheLayout("flash_packed", block_size=block_size, num_kv_heads=heads, head_size=head_size)


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
