"""TorchPagedMemGPUConnector: the torch implementation of the all-layers paged transfer.

It is the CPU path of VLLMPagedMemGPUConnectorV2 (``vllm_paged.py``) and the bit-for-bit
reference of its CUDA kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcache.gpu_connector.base import GPUConnectorInterface, _check_batch
from lmcache.gpu_connector.kv_layout import KVCacheLayout, check_layer_tensors
from lmcache.gpu_connector.kv_transfer import (gather_kv, kv_out_shape, scatter_kv,
                                                scratch_buffer)
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata


class TorchPagedMemGPUConnector(GPUConnectorInterface):
    """Connector for vLLM's paged KV cache, all layers of a chunk per call (torch path).

    MemoryObj format: KV_2LTD ``[2, L, T, H*D]`` (MLA: KV_MLA_FMT ``[1, L, T, D]``), dtype
    ``metadata.kv_dtype``, on the CPU (or any device). The paged tensors (``kvcaches``, one per
    layer, layout ``layout``) may be CPU or CUDA tensors. One vectorised gather (or
    index_put) per layer per chunk and one device copy per chunk; see ``kv_transfer`` for the
    exact semantics (the reference of the CUDA kernel).

    Args:
        metadata: the worker's LMCacheMetadata (layers, heads, head size, dtype, MLA).
        layout: the layer tensors' KVCacheLayout, built by the integration from the engine.

    Raises:
        TypeError: wrong argument types.
        ValueError: layout disagrees with metadata (heads, head size, MLA).
    """

    def __init__(self, metadata: LMCacheMetadata, layout: KVCacheLayout) -> None:
        if not isinstance(metadata, LMCacheMetadata):
            raise TypeError(f"metadata must be LMCacheMetadata, got {type(metadata).__name__}")
        if not isinstance(layout, KVCacheLayout):
            raise TypeError(f"layout must be KVCacheLayout, got {type(layout).__name__}")
        if layout.is_mla != metadata.use_mla:
            raise ValueError(
                f"layout kind {layout.kind!r} does not match metadata use_mla={metadata.use_mla}"
            )
        if (layout.num_kv_heads, layout.head_size) != (metadata.num_kv_heads, metadata.head_size):
            raise ValueError(
                f"layout has num_kv_heads={layout.num_kv_heads}, head_size={layout.head_size}; "
                f"metadata kv_shape {metadata.kv_shape} has num_kv_heads="
                f"{metadata.num_kv_heads}, head_size={metadata.head_size}"
            )
        self.metadata = metadata
        self.layout = layout
        self.fmt = MemoryFormat.KV_MLA_FMT if layout.is_mla else MemoryFormat.KV_2LTD

    def get_shape(self, num_tokens: int) -> torch.Size:
        """``[2, L, num_tokens, H*D]`` (MLA ``[1, L, num_tokens, D]``)."""
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        return kv_out_shape(self.layout, self.metadata.num_layers, num_tokens)

    def validate_kvcaches(self, kvcaches: object) -> None:
        """Check one tensor per layer, each of the layout's shape and ``metadata.kv_dtype``.

        Raises:
            TypeError / ValueError: naming the offending layer's shape/dtype and the expected.
        """
        super().validate_kvcaches(kvcaches)
        check_layer_tensors(kvcaches, self.layout, self.metadata.kv_shape, self.metadata.kv_dtype)

    # ---- transfers --------------------------------------------------------------------
    def from_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs) -> None:
        """Gather tokens ``[start, end)`` of all layers into ``memory_obj`` (KV_2LTD).

        Raises:
            ValueError: bad kwargs, a slot outside the cache or < 0 (padding has no KV to
                store), or a MemoryObj of the wrong shape/dtype/format.
        """
        self.batched_from_gpu([memory_obj], [start], [end], **kwargs)

    def to_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs) -> None:
        """Scatter ``memory_obj`` into tokens ``[start, end)`` of all layers; -1 slots skipped.

        Raises:
            ValueError: bad kwargs, a slot outside the cache, or a MemoryObj of the wrong
                shape/dtype/format.
        """
        self.batched_to_gpu([memory_obj], [start], [end], **kwargs)

    def batched_from_gpu(
        self, memory_objs: Sequence[MemoryObj], starts: Sequence[int], ends: Sequence[int],
        **kwargs,
    ) -> None:
        """``from_gpu`` for each chunk; kwargs validated once. Several chunks whose objects
        are on the caches' device (CPU caches) are gathered in one pass over every layer into a
        reused scratch buffer, then copied into each object (per-op overheads dominate per-chunk
        calls of small layers)."""
        kvcaches = self._prepare(memory_objs, starts, ends, kwargs)
        if self._batchable(memory_objs, kvcaches):
            slots = [self._slots(s, e, kwargs, kvcaches, allow_padding=False)
                     for s, e in zip(starts, ends)]
            tmp = self._scratch(sum(e - s for s, e in zip(starts, ends)), kvcaches[0])
            gather_kv(kvcaches, torch.cat(slots), self.layout, out=tmp)
            pos = 0
            for obj, start, end in zip(memory_objs, starts, ends):
                obj.tensor.copy_(tmp[:, :, pos:pos + end - start])
                pos += end - start
            return
        for obj, start, end in zip(memory_objs, starts, ends):
            slots = self._slots(start, end, kwargs, kvcaches, allow_padding=False)
            dst = obj.tensor
            if dst.device == kvcaches[0].device:
                gather_kv(kvcaches, slots, self.layout, out=dst)
            else:
                dst.copy_(gather_kv(kvcaches, slots, self.layout))

    def batched_to_gpu(
        self, memory_objs: Sequence[MemoryObj], starts: Sequence[int], ends: Sequence[int],
        **kwargs,
    ) -> None:
        """``to_gpu`` for each chunk; kwargs validated once (several CPU chunks: one scatter
        over every layer from a scratch buffer, as :meth:`batched_from_gpu`)."""
        kvcaches = self._prepare(memory_objs, starts, ends, kwargs)
        if self._batchable(memory_objs, kvcaches):
            slots = [self._slots(s, e, kwargs, kvcaches, allow_padding=True)
                     for s, e in zip(starts, ends)]
            tmp = self._scratch(sum(e - s for s, e in zip(starts, ends)), kvcaches[0])
            pos = 0
            for obj, start, end in zip(memory_objs, starts, ends):
                tmp[:, :, pos:pos + end - start].copy_(obj.tensor)
                pos += end - start
            scatter_kv(kvcaches, torch.cat(slots), self.layout, tmp)
            return
        for obj, start, end in zip(memory_objs, starts, ends):
            slots = self._slots(start, end, kwargs, kvcaches, allow_padding=True)
            scatter_kv(kvcaches, slots, self.layout, obj.tensor)

    @staticmethod
    def _batchable(memory_objs, kvcaches) -> bool:
        """Several objects, all on the CPU caches' device: one pass through a scratch buffer."""
        device = kvcaches[0].device
        return len(memory_objs) > 1 and device.type == "cpu" and all(
            o.tensor.device == device for o in memory_objs)

    def _scratch(self, tokens: int, ref: torch.Tensor) -> torch.Tensor:
        """A reused ``[2, L, tokens, H*D]`` buffer (KV_2LTD of the whole batch)."""
        shape = kv_out_shape(self.layout, self.metadata.num_layers, tokens)
        return scratch_buffer(2, tuple(shape), ref.dtype, ref.device)

    # ---- checks -----------------------------------------------------------------------
    def _prepare(self, memory_objs, starts, ends, kwargs) -> Sequence[torch.Tensor]:
        _check_batch(memory_objs, starts, ends)
        kvcaches = kwargs.get("kvcaches")
        self.validate_kvcaches(kvcaches)
        for obj, start, end in zip(memory_objs, starts, ends):
            if not isinstance(start, int) or not isinstance(end, int) or not 0 <= start <= end:
                raise ValueError(f"need ints 0 <= start <= end, got start={start!r}, end={end!r}")
            want = self.get_shape(end - start)
            tensor = obj.tensor
            kv_dtype = self.metadata.kv_dtype
            if tensor.shape != want or tensor.dtype != kv_dtype or obj.fmt != self.fmt:
                raise ValueError(
                    f"MemoryObj for tokens [{start}, {end}) has shape {tuple(tensor.shape)} "
                    f"dtype {tensor.dtype} fmt {obj.fmt.name}; expected {tuple(want)} "
                    f"{self.metadata.kv_dtype} {self.fmt.name}"
                )
        return kvcaches

    def _slots(
        self, start: int, end: int, kwargs: dict, kvcaches: Sequence[torch.Tensor],
        allow_padding: bool,
    ) -> torch.Tensor:
        slot_mapping = kwargs.get("slot_mapping")
        offset = kwargs.get("offset", 0)
        if (
            not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1
            or slot_mapping.dtype.is_floating_point or slot_mapping.dtype == torch.bool
        ):
            raise ValueError(
                f"slot_mapping must be a 1-D integer torch.Tensor, got {slot_mapping!r:.80}"
            )
        if not isinstance(offset, int) or offset < 0 or start < offset:
            raise ValueError(f"offset must be an int in [0, start={start}], got {offset!r}")
        if end - offset > slot_mapping.numel():
            raise ValueError(
                f"tokens [{start}, {end}) with offset {offset} need slot_mapping[{start - offset}:"
                f"{end - offset}], but slot_mapping has {slot_mapping.numel()} entries"
            )
        slots = slot_mapping[start - offset:end - offset].to(kvcaches[0].device, torch.int64)
        if slots.numel():
            lo, hi = (int(v) for v in torch.aminmax(slots))
            num_slots = self.layout.num_slots(kvcaches[0])
            low = -1 if allow_padding else 0
            if lo < low or hi >= num_slots:
                raise ValueError(
                    f"slot_mapping[{start - offset}:{end - offset}] holds slots in [{lo}, {hi}]; "
                    f"valid slots are [{low}, {num_slots - 1}]"
                    + ("" if allow_padding else " (padding -1 has no KV to store)")
                )
        return slots
