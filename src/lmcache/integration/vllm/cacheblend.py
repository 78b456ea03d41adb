"""CacheBlendRunner: option ``blend=cacheblend`` — CacheBlend through vLLM (issue 9).

The worker builds it with its LMCacheEngine and gpu_connector (the container's ``blender``
slot). The vLLM model object exists only once vLLM has loaded it, after lmcache's container is
configured, so it is the one collaborator bound late: either given to the constructor
(``vllm_model=``, where it is known, e.g. tests and benchmarks) or bound once with
:meth:`attach_model` (the vLLM worker does this at start); :meth:`blend` before that raises
RuntimeError. Nothing else is set after construction: the model's RoPE re-positions cached K by
being passed to each retrieve (the connector itself is not modified). It is then used on both
sides of a request:

* scheduler lookup (served by the worker's LookupServer, to which the runner is handed in place
  of the engine): :meth:`lookup` answers ``N - 1`` for a prompt of ``N`` tokens holding at least
  ``blend_min_tokens`` tokens of cached segments (``engine.blend_lookup``), else 0. The Blender
  fills the KV of every token but the last (reused, recomputed or uncached alike), so vLLM
  takes ``N - 1`` tokens from lmcache and computes only the last one (its logits).
* load: :meth:`blend` runs ``engine.retrieve_layers_for_blend`` → :class:`BlendLayerKV` →
  :class:`~lmcache.blend.blender.Blender` and writes each finished layer into vLLM's paged KV
  with the connector's ``write_layer``.

Stores need nothing here: the engine's CacheBlend data path stores segments with positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch

from lmcache.blend.blender import Blender
from lmcache.blend.layerwise_model import LayerwiseModel
from lmcache.engine.blend_layers import BlendLayerKV
from lmcache.engine.blend_retriever import is_blend_connector

logger = logging.getLogger(__name__)


class CacheBlendRunner:
    """Blend lookup and blend load of one vLLM worker (module docstring).

    Args:
        engine: the worker's LMCacheEngine, with the CacheBlend data path
            (``gpu_connector=vllm_buffer_layerwise``, ``token_database=segment``).
        gpu_connector: that engine's VLLMBufferLayerwiseGPUConnector (writes finished layers).
        blend_check_layers: LMCache's list form: strictly increasing layer indices where
            tokens are selected (default ``[1]``; :class:`~lmcache.blend.blender.Blender`).
        blend_recompute_ratios: LMCache's list form: one ratio in [0, 1] for every check
            layer, or one per check layer (default ``[0.15]``).
        blend_min_tokens: prompts with fewer blendable tokens are not blended (LMCache: 256).
        vllm_model: the worker's vLLM model object when it is known at construction (else
            bind it with :meth:`attach_model`).

    Attributes (counters since start, for tests and metrics):
        blended_requests, reused_tokens (cached tokens of blended requests), recomputed_tokens
        (tokens recomputed after the check layer, uncached ones included), last_recomputed
        (int64 indices of the last blend's recomputed tokens).

    Raises:
        TypeError: a connector without the CacheBlend data path.
        ValueError: a bad ratio, layer list or ``blend_min_tokens`` (named); with
            ``vllm_model``, whatever :meth:`attach_model` raises.
    """

    def __init__(self, engine: Any, gpu_connector: Any,
                 blend_check_layers: Union[int, Sequence[int]] = (1,),
                 blend_recompute_ratios: Union[float, Sequence[float]] = (0.15,),
                 blend_min_tokens: int = 256, vllm_model: Any = None) -> None:
        if not is_blend_connector(gpu_connector):
            raise TypeError("blend=cacheblend needs gpu_connector=vllm_buffer_layerwise, got "
                            f"{type(gpu_connector).__name__}")
        if isinstance(blend_min_tokens, bool) or not isinstance(blend_min_tokens, int) or \
                blend_min_tokens < 1:
            raise ValueError(f"blend_min_tokens must be an int >= 1, got {blend_min_tokens!r}")
        self.engine, self.gpu_connector = engine, gpu_connector
        self.blend_check_layers = list(blend_check_layers) if not isinstance(
            blend_check_layers, int) else [blend_check_layers]
        self.blend_recompute_ratios = list(blend_recompute_ratios) if not isinstance(
            blend_recompute_ratios, (int, float)) else [blend_recompute_ratios]
        self.blend_min_tokens = blend_min_tokens
        self.model: Optional[LayerwiseModel] = None
        self.blender: Optional[Blender] = None
        self.blended_requests = self.reused_tokens = self.recomputed_tokens = 0
        self.last_recomputed: Optional[torch.Tensor] = None
        if vllm_model is not None:
            self.attach_model(vllm_model)

    def attach_model(self, vllm_model: Any) -> None:
        """Bind ``vllm_model`` (the worker's model object) for blending: the one late-bound
        collaborator, bound once.

        Raises:
            RuntimeError: a model is already bound.
            ValueError: an architecture, parallelism or RoPE CacheBlend cannot run (from
                :class:`LayerwiseModel`), a model whose layer count or KV width differs from
                the engine's metadata, or bad check layers / ratios (from :class:`Blender`).
        """
        if self.model is not None:
            raise RuntimeError(f"CacheBlendRunner already has a model "
                               f"({self.model.architecture}); it is bound once")
        model = LayerwiseModel(vllm_model)
        md = self.engine.metadata
        if model.num_layers != md.num_layers or model.kv_size != md.hidden_dim:
            raise ValueError(
                f"{model.architecture}: {model.num_layers} layers of KV width {model.kv_size}, but "
                f"the KV caches have {md.num_layers} layers of width {md.hidden_dim}")
        blender = Blender(model, self.blend_check_layers, self.blend_recompute_ratios)
        self.model, self.blender = model, blender

    @property
    def ratio(self) -> float:
        """The recompute ratio in use."""
        return float(self.blend_recompute_ratios[0]) if self.blender is None else self.blender.ratio

    @ratio.setter
    def ratio(self, value: float) -> None:
        self.blend_recompute_ratios = [value]
        if self.model is not None:
            self.blender = Blender(self.model, self.blend_check_layers, [value])

    # ---- scheduler lookup (LookupServer's engine interface) ---------------------------------
    def lookup(self, tokens, pin: bool = False, lookup_id: object = None,
               request_configs: Optional[dict] = None) -> int:
        """Tokens vLLM may take from lmcache: ``len(tokens) - 1`` when at least
        ``blend_min_tokens`` of them belong to cached segments, else 0 (nothing is pinned:
        the load fetches the segments again and a segment gone by then is recomputed)."""
        mask = self.engine.blend_lookup(tokens, request_configs)
        return len(mask) - 1 if int(mask.sum()) >= self.blend_min_tokens else 0

    def lookup_unpin(self, lookup_id: object) -> None:
        """Release the engine's pins of ``lookup_id`` (blend lookups take none)."""
        self.engine.lookup_unpin(lookup_id)

    # ---- load ---------------------------------------------------------------------------
    def blend(self, tokens: torch.Tensor, kv_caches: list[torch.Tensor],
              slot_mapping: torch.Tensor, request_configs: Optional[dict] = None
              ) -> Optional[torch.Tensor]:
        """Blend the context ``tokens`` (the prompt from token 0, without its last token) and
        write every layer's K/V into ``kv_caches`` at ``slot_mapping``.

        Args:
            tokens: int64 ``[T]``. kv_caches: vLLM's paged tensors, one per layer.
            slot_mapping: int64 ``[T]`` paged slots (-1: not written).

        Returns:
            CPU bool ``[T]`` all True (every token's KV was written), or None when no cached
            segment was found any more (nothing written; vLLM recomputes).

        Raises:
            RuntimeError: no model bound yet (``vllm_model=`` or :meth:`attach_model`).
                Errors of retrieve / blend / write propagate.
        """
        if self.blender is None:
            raise RuntimeError("CacheBlendRunner has no model: give vllm_model= or bind the "
                               "worker's model with attach_model() before blending")
        ids = torch.as_tensor(tokens, dtype=torch.long).cpu()
        kv = BlendLayerKV(self.engine.retrieve_layers_for_blend(
            ids, request_configs=request_configs, device=self.model.device,
            rotary=self.model.fused_rotary_emb), self.model.num_layers)
        try:
            if not bool(kv.mask.any()):
                return None
            uncached = (~kv.mask).to(self.model.device)
            for i, (k, v) in self.blender.blend_layerwise(ids, kv, uncached=uncached):
                self.gpu_connector.write_layer(torch.stack((k, v)), kv_caches[i],
                                               slot_mapping=slot_mapping)
        finally:
            kv.close()
            self.gpu_connector.wait_writes()  # CUDA: the one host sync; bad slots raise here
        self.blended_requests += 1
        self.reused_tokens += int(kv.mask.sum())
        self.last_recomputed = self.blender.last_recomputed
        self.recomputed_tokens += int(self.last_recomputed.numel())
        return torch.ones(ids.numel(), dtype=torch.bool)

    def close(self) -> None:
        """Forget the model (the engine and connector are closed by their owner)."""
        self.model = self.blender = None
