"""BlendConnectorWorker: the vLLM worker side with ``blend=cacheblend``.

Loads: a request whose lookup the :class:`~lmcache.integration.vllm.cacheblend.CacheBlendRunner`
answered takes its first ``N - 1`` tokens from lmcache; before the forward pass this worker
blends them (all layers, written into vLLM's paged KV) and vLLM computes the last token.
A blend that fails, or finds no cached segment any more, reports the request's blocks as
invalid, so vLLM recomputes them (never wrong KV). Saves: as :class:`ConnectorWorker`
(``engine.store`` takes the CacheBlend data path: segments with their positions).

:func:`find_vllm_model` finds the worker's model object from vLLM's attention layers (vLLM has
no hook that hands it to a KV connector; LMCache patches vLLM's model runner instead).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from lmcache.integration.vllm.specs import ReqMeta
from lmcache.integration.vllm.worker import ConnectorWorker

logger = logging.getLogger(__name__)


def find_vllm_model(attention_layer: Any) -> Any:
    """The ``nn.Module`` whose ``.model.layers[i].self_attn.attn`` is ``attention_layer`` (one
    of vLLM's ``Attention`` modules, from ``static_forward_context``).

    Raises:
        ValueError: no such model object in this process (named with the layer's class).
    """
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.nn.Module):  # type(): no __class__ lookups
            continue
        layers = getattr(getattr(obj, "model", None), "layers", None)
        try:
            attns = [getattr(getattr(layer, "self_attn", None), "attn", None) for layer in layers]
        except TypeError:
            continue
        if any(a is attention_layer for a in attns):
            return obj
    raise ValueError(f"CacheBlend: no model object holding the attention layer "
                     f"{type(attention_layer).__name__} was found in this worker; only "
                     "decoder models with .model.layers[i].self_attn.attn can be blended")


class BlendConnectorWorker(ConnectorWorker):
    """ConnectorWorker whose loads blend (module docstring).

    Args:
        engine, kv_caches, block_size: as :class:`ConnectorWorker`.
        runner: the CacheBlendRunner, with its model attached.

    Attributes:
        blend_failures: loads that could not blend (vLLM recomputed them).
    """

    def __init__(self, engine, kv_caches: list[torch.Tensor], block_size: int, runner) -> None:
        super().__init__(engine, kv_caches, block_size)
        self.runner = runner
        self.blend_failures = 0

    def _load_one(self, req: ReqMeta) -> None:
        ret_mask = None
        if req.load_from != 0:  # vLLM holds a prefix: the blend would overwrite its blocks
            logger.warning("request %s: vLLM holds %d tokens; CacheBlend needs the whole "
                           "context, vLLM recomputes", req.req_id, req.load_from)
        else:
            tokens = req.token_ids[:req.load_end]
            slots = req.slot_mapping[:req.load_end]
            try:
                ret_mask = self.runner.blend(tokens, self.kv_caches, slots,
                                             request_configs=req.request_configs)
            except Exception:
                logger.exception("blend for request %s failed; vLLM will recompute", req.req_id)
        if ret_mask is None:
            self.blend_failures += 1
            ret_mask = torch.zeros(req.load_end, dtype=torch.bool)
        else:
            ret_mask = torch.cat([ret_mask, torch.zeros(max(req.load_end - ret_mask.numel(), 0),
                                                        dtype=torch.bool)])
        self.record_load(req, ret_mask)
