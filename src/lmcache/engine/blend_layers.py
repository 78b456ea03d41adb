"""BlendLayerKV: the engine's CacheBlend retrieve generator as the Blender's ``cached_kv``.

``LMCacheEngine.retrieve_layers_for_blend`` yields the cached-token mask, then one
double-buffered ``[2, N, H, D]`` buffer per layer (each valid until the next ``next()``).
:class:`lmcache.blend.blender.Blender` reads ``cached_kv[i] -> (k, v)``, each ``[N, H*D]``, one
layer at a time in increasing order (from its check layer on), modifies them in place and
yields them to be written into vLLM's paged cache before it asks for the next layer. This
adapter gives it exactly that::

    kv = BlendLayerKV(engine.retrieve_layers_for_blend(tokens, positions))
    for i, (k, v) in blender.blend_layerwise(tokens, kv, uncached=~kv.mask.to(dev), positions=pos):
        connector.write_layer(torch.stack((k, v)), kvcaches[i], slot_mapping=slots)
    kv.close()
    connector.wait_writes()   # CUDA writes are enqueued; bad slots are reported here

Layers skipped by the reader (before the check layer) are stepped over (loaded, not used).
"""

from __future__ import annotations

from collections.abc import Generator

import torch


class BlendLayerKV:
    """Sequence view ``[i] -> (k, v)`` (each ``[N, H*D]``, views of layer i's buffer).

    Args:
        layers: a generator from ``retrieve_layers_for_blend`` (not started); the first
            ``next()`` (done here) yields the mask, then one ``[2, N, H, D]`` buffer per layer.
        num_layers: L (``len()``); None = the engine's ``metadata.num_layers`` is unknown here,
            so ``len()`` raises TypeError.

    Attributes:
        mask: CPU bool ``[N]``, True = the token's K/V comes from a reused segment.

    Raises:
        IndexError: a layer before the current one (its buffer was reused) or past the end.
    """

    def __init__(self, layers: Generator, num_layers: int | None = None) -> None:
        self._layers = layers
        self.mask: torch.Tensor = next(layers)
        self._num_layers = num_layers
        self._index = -1
        self._current: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        if self._num_layers is None:
            raise TypeError("BlendLayerKV was built without num_layers")
        return self._num_layers

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < self._index:
            raise IndexError(f"layer {layer!r}: layers are read once, in increasing order "
                             f"(current layer {self._index}; earlier buffers were reused)")
        while self._index < layer:
            buf = next(self._layers, None)
            if buf is None:
                raise IndexError(f"layer {layer} is past the last layer {self._index}")
            self._index += 1
            n = buf.shape[1]
            self._current = (buf[0].view(n, -1), buf[1].view(n, -1))
        return self._current

    def close(self) -> None:
        """Release every fetched segment (closes the generator; idempotent)."""
        self._layers.close()
