"""Blender: CacheBlend's selective recompute over reused K/V (LMCache's ``LMCBlender``).

A prompt made of segments cached separately (documents computed alone, at other positions) has,
after re-positioning (:class:`~lmcache.blend.rotary.FusedRotaryEmb`), K/V that lack the
cross-attention between segments. CacheBlend fixes the tokens that matter most:

1. Layers ``0 .. c1`` (``c1`` = the first of ``blend_check_layers``) are computed for all
   tokens; their K/V are the fresh ones (layer 0's K depends only on token and position, so this
   costs what LMCache's layer-0 recompute costs, and those layers come out exact).
2. At each check layer each token still computed there gets its deviation
   ``sum((k_fresh - k_cached)**2)``; the top ``ratio`` fraction of those of them that have a
   cache, plus every token without one, go on being computed
   (:func:`~lmcache.blend.selection.select_recompute_tokens`). As in LMCache's
   ``process_qkv``, the fraction is of the tokens that reach the check layer: with
   ``blend_check_layers=[1, 8]`` and ratios ``[0.3, 0.5]`` layers 2..8 recompute 30 % of the
   cached tokens and layers 9.. 15 %. One ratio is used at every check layer (LMCache reads
   ``blend_recompute_ratios[0]`` at each); a list gives one per check layer.
3. Other layers compute only the selected tokens: their fresh K/V replace the cached rows, and
   their queries attend causally over the whole combined K/V of the layer.

Gaps: LMCache zeroes the K/V of tokens no retrieved chunk covers (the separators between
segments) before blending and relies on the top-k to pick them (their deviation from zero is
large). Here those rows (``uncached``, zero in the connector's buffers as in LMCache) are always
selected, so the output never holds a zeroed gap.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch

from lmcache.blend.layerwise_model import LayerwiseModel, check_tokens
from lmcache.blend.selection import (check_layers, check_ratios, k_deviation,
                                     select_recompute_tokens)

KV = tuple[torch.Tensor, torch.Tensor]


class Blender:
    """Blends cached per-layer K/V with a selective recompute, layer by layer.

    Args:
        model: the :class:`LayerwiseModel` over the worker's vLLM model (its weights, its
            ``fused_rotary_emb`` for re-positioning cached K before a blend).
        blend_check_layers: the layers where tokens are selected: LMCache's list form
            (non-empty, strictly increasing layer indices in ``[0, num_layers)``) or one int.
            Default ``[1]``.
        blend_recompute_ratios: fraction in ``[0, 1]`` of the cached tokens reaching a check
            layer that go on being recomputed after it: one value for every check layer (a
            float or a one-element list, as LMCache uses its first) or one per check layer.

    Attributes:
        check_layers: the check layers (list of int); ratios: one ratio per check layer;
        ratio: the first check layer's ratio.

    Raises:
        ValueError: an empty, unsorted or repeated layer list, a layer out of range or not
            an int, a ratio outside [0, 1], or a ratio list whose length is neither 1 nor the
            number of check layers (each names the value and what was expected).
    """

    def __init__(self, model: LayerwiseModel,
                 blend_check_layers: Union[int, Sequence[int]] = (1,),
                 blend_recompute_ratios: Union[float, Sequence[float]] = (0.15,)) -> None:
        self.model = model
        self.check_layers = check_layers(blend_check_layers, model.num_layers)
        self.ratios = check_ratios(blend_recompute_ratios, len(self.check_layers))
        self.ratio = self.ratios[0]
        #: indices (int64, ascending) of the tokens the last blend recomputed after its last
        #: check layer; None before the first blend.
        self.last_recomputed: Optional[torch.Tensor] = None
        #: per check layer, the indices selected there by the last blend.
        self.last_selections: list[torch.Tensor] = []

    @classmethod
    def from_vllm_model(cls, vllm_model: Any, blend_check_layers: Union[int, Sequence[int]] = (1,),
                        blend_recompute_ratios: Union[float, Sequence[float]] = (0.15,)
                        ) -> "Blender":
        """A Blender over ``LayerwiseModel(vllm_model)`` (ValueError for unsupported models)."""
        return cls(LayerwiseModel(vllm_model), blend_check_layers, blend_recompute_ratios)

    @torch.inference_mode()
    def blend_layerwise(self, token_ids: Union[torch.Tensor, list[int]],
                        cached_kv: Sequence[KV], uncached: Optional[torch.Tensor] = None,
                        positions: Optional[torch.Tensor] = None) -> Iterator[tuple[int, KV]]:
        """Blend layer by layer; yields ``(layer_id, (k, v))`` as soon as each layer is done.

        Args:
            token_ids: int64 ``[T]``: the whole context the attention sees (the prompt from its
                first token); on any device.
            cached_kv: indexable by layer id; ``cached_kv[i]`` is ``(k, v)``, each
                ``[T, kv_size]`` in the model's dtype on its device, K already re-positioned
                to ``positions``. It is read only from the first check layer on, in increasing
                layer order, so a lazy sequence can load layers on demand (the first check
                layer is read once before any compute, so that its load overlaps the layers
                before it, and again when it is blended). Rows of ``uncached``
                tokens are ignored (LMCache's buffers hold zeros there). **Modified in place**
                from the layer after the first check layer (every recomputed row, the
                uncached ones included, overwritten) and yielded.
            uncached: bool ``[T]``, True = no cache for that token (separators, new text);
                None = every token cached.
            positions: int64 ``[T]`` strictly increasing; None = ``0..T-1``.

        Yields:
            ``(i, (k_i, v_i))`` for ``i = 0 .. num_layers-1``, ``[T, kv_size]`` each: fresh K/V
            up to the first check layer, the combined K/V after it — what the connector writes into
            vLLM's paged KV for these tokens.

        Raises:
            ValueError: bad tokens/positions/mask, or a cached layer of the wrong shape,
                dtype or device (named).
        """
        m = self.model
        ids, pos = check_tokens(token_ids, positions, m.device)
        n = ids.numel()
        if uncached is None:
            uncached = torch.zeros(n, dtype=torch.bool, device=m.device)
        if not isinstance(uncached, torch.Tensor) or uncached.shape != (n,) or (
                uncached.dtype != torch.bool):
            raise ValueError(f"uncached must be a bool tensor of shape ({n},), got "
                             f"{getattr(uncached, 'shape', uncached)!r}")
        uncached = uncached.to(m.device)
        checks = dict(zip(self.check_layers, self.ratios))
        # Ask for the first check layer's cache before any compute: a lazy loader (the
        # double-buffered connector) then copies it while layers 0..c are computed.
        self._cached(cached_kv, self.check_layers[0], n)
        hidden, residual = m.embed(ids), None
        sel_pos = pos
        selected: Optional[torch.Tensor] = None   # None: every token is computed
        self.last_selections = []
        try:
            for i in range(m.num_layers):
                if selected is not None and not selected.numel():  # pure reuse from here on
                    yield i, self._cached(cached_kv, i, n)
                    continue
                q, k, v, residual = m.qkv(i, hidden, residual, sel_pos)
                if selected is None:
                    kv, keys, values = (k, v), k, v
                    if i in checks:
                        old_k, _ = self._cached(cached_kv, i, n)
                        selected = select_recompute_tokens(k_deviation(k, old_k), uncached,
                                                           checks[i])
                        keep = selected
                else:
                    old_k, old_v = self._cached(cached_kv, i, n)
                    if i in checks:  # narrow the selection among the tokens computed here
                        keep = select_recompute_tokens(k_deviation(k, old_k[selected]),
                                                       uncached[selected], checks[i])
                    old_k[selected] = k  # selected ⊇ uncached: no gap row stays as given
                    old_v[selected] = v
                    kv, keys, values = (old_k, old_v), old_k, old_v
                    if i in checks:
                        selected = selected[keep]
                if i in checks:
                    self.last_selections.append(selected)
                    self.last_recomputed = selected
                    sel_pos, q, residual = sel_pos[keep], q[keep], residual[keep]
                more = i + 1 < m.num_layers and sel_pos.numel()
                attn = m.attention(i, q, sel_pos, keys, values, pos) if more else None
                yield i, kv
                if more:
                    hidden, residual = m.finish(i, attn, residual)
        finally:
            m.release_attention_cache()

    def blend(self, token_ids: Union[torch.Tensor, list[int]], cached_kv: Sequence[KV],
              uncached: Optional[torch.Tensor] = None,
              positions: Optional[torch.Tensor] = None) -> list[KV]:
        """All layers of :meth:`blend_layerwise` as a list ``[(k_i, v_i), ...]``."""
        return [kv for _, kv in self.blend_layerwise(token_ids, cached_kv, uncached, positions)]

    def _cached(self, cached_kv: Sequence[KV], layer_id: int, n: int) -> KV:
        k, v = cached_kv[layer_id]
        m = self.model
        for name, t in (("k", k), ("v", v)):
            if (not isinstance(t, torch.Tensor) or t.shape != (n, m.kv_size)
                    or t.dtype != m.dtype or t.device != m.device):
                raise ValueError(
                    f"cached_kv[{layer_id}] {name} must be [{n}, {m.kv_size}] {m.dtype} on "
                    f"{m.device}, got {getattr(t, 'shape', t)!r} {getattr(t, 'dtype', '')} "
                    f"{getattr(t, 'device', '')}")
        return k, v
