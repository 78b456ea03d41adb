"""VLLMPagedMemLayerwiseGPUConnector: moves KV one layer at a time, overlapping with compute.

MemoryObjs are KV_T2D ``[T, 2, H*D]`` (MLA ``[T, 1, D]``), one per (chunk, layer), dtype
``metadata.kv_dtype`` (LMCache's layerwise format, DESIGN §4.4). On a CUDA cache with the CuPy
backend each layer is one launch of ``csrc/vllm_layerwise.cu`` (every chunk of the layer at once),
reading/writing pinned MemoryObjs through their mapped addresses, on ``store_stream`` /
``load_stream``; otherwise the torch reference (``kv_transfer``) runs synchronously.

Generator protocol (for LMCacheEngine.store_layer / retrieve_layer and the vLLM connector)::

    # store: memory_objs[layer][chunk], all allocated before the forward pass
    gen = conn.batched_from_gpu(memory_objs, starts, ends, kvcaches=..., slot_mapping=...)
    for layer in range(L):     # from save_kv_layer, after layer's attention was enqueued
        next(gen)              # store_stream waits on an event of the compute stream, then
                               # copies this layer out (async); yields a LayerTransfer
    next(gen, None)            # from wait_for_save: waits for every copy, checks slots;
                               # afterwards the objects are complete and the pages may be freed

    # retrieve: objects sent per layer (or all given up front as memory_objs[layer][chunk])
    gen = conn.batched_to_gpu(None, starts, ends, kvcaches=..., slot_mapping=...)
    next(gen)                  # prime: records the compute-stream event loads wait for
    t = gen.send(objs_of_layer)   # enqueue that layer's load (async), yields a LayerTransfer
    t.wait_on()                # in wait_for_layer_load: compute stream waits, host does not
    ...                        # one send per layer, in layer order
    next(gen, None)            # waits for every load, checks slots; objects may be released

``LayerTransfer.wait_on(stream)`` makes a stream wait for that layer's copy; on the torch path
the copy already happened and it does nothing. Bad slots raise ValueError at the final step.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Optional

import torch

from lmcache.gpu_connector.base import GPUConnectorInterface
from lmcache.gpu_connector.cupy_kernels import TransferHandle, launch_transfer
from lmcache.gpu_connector.kv_layout import KVCacheLayout, check_layer_tensors
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv
from lmcache.gpu_connector.vllm_paged import CopyStreams, _slot_kwargs, resolve_backend
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata


class LayerTransfer:
    """One layer's enqueued copy (``handle`` None: done synchronously on the torch path)."""

    def __init__(self, layer_id: int, handle: Optional[TransferHandle] = None) -> None:
        self.layer_id = layer_id
        self.handle = handle

    def wait_on(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Make ``stream`` (default: current) wait for this copy, without blocking the host."""
        if self.handle is not None:
            self.handle.wait_on(stream)

    def wait(self) -> None:
        """Block the host until this copy finished (ValueError on an out-of-range slot)."""
        if self.handle is not None:
            self.handle.wait()


class VLLMPagedMemLayerwiseGPUConnector(GPUConnectorInterface):
    """Layer-by-layer connector for vLLM's paged KV cache (see module docstring).

    Args:
        metadata: the worker's LMCacheMetadata (layers, heads, head size, dtype, MLA).
        layout: the layer tensors' KVCacheLayout.
        backend: ``"auto"`` (kernels when CuPy sees a GPU and the cache is on it), ``"cupy"``,
            ``"torch"``.

    Raises:
        TypeError / ValueError: wrong types; layout disagreeing with metadata; bad backend.
        RuntimeError: backend ``"cupy"`` without CuPy/CUDA.
    """

    def __init__(
        self, metadata: LMCacheMetadata, layout: KVCacheLayout, backend: str = "auto"
    ) -> None:
        if not isinstance(metadata, LMCacheMetadata):
            raise TypeError(f"metadata must be LMCacheMetadata, got {type(metadata).__name__}")
        if not isinstance(layout, KVCacheLayout):
            raise TypeError(f"layout must be KVCacheLayout, got {type(layout).__name__}")
        if layout.is_mla != metadata.use_mla or (layout.num_kv_heads, layout.head_size) != (
            metadata.num_kv_heads, metadata.head_size
        ):
            raise ValueError(
                f"layout {layout} disagrees with metadata kv_shape {metadata.kv_shape} "
                f"use_mla={metadata.use_mla}"
            )
        self.metadata = metadata
        self.layout = layout
        self.backend = resolve_backend(backend)
        self.fmt = MemoryFormat.KV_T2D
        self.streams = CopyStreams()
        self._num_kv = 1 if layout.is_mla else 2

    def get_shape(self, num_tokens: int) -> torch.Size:
        """``[num_tokens, 2, H*D]`` (MLA ``[num_tokens, 1, D]``): one layer of one chunk."""
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        return torch.Size((num_tokens, self._num_kv, self.layout.hidden_dim))

    def validate_kvcaches(self, kvcaches: object) -> None:
        """One tensor per layer, each of the layout's shape, ``kv_dtype`` and block count."""
        super().validate_kvcaches(kvcaches)
        check_layer_tensors(kvcaches, self.layout, self.metadata.kv_shape, self.metadata.kv_dtype)

    def synchronize(self) -> None:
        """Wait until every copy this connector enqueued finished."""
        self.streams.synchronize()

    # ---- one layer, one chunk, synchronous --------------------------------------------
    def from_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs) -> None:
        """Copy layer ``kwargs["layer_id"]`` of tokens ``[start, end)`` into ``memory_obj``."""
        gen = self._store(self._one_layer(memory_obj, kwargs), [start], [end], kwargs)
        for _ in gen:
            pass

    def to_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs) -> None:
        """Copy ``memory_obj`` into layer ``kwargs["layer_id"]`` of tokens ``[start, end)``."""
        gen = self._load(self._one_layer(memory_obj, kwargs), [start], [end], kwargs)
        for _ in gen:
            pass

    # ---- generators -------------------------------------------------------------------
    def batched_from_gpu(
        self, memory_objs: Sequence[Sequence[MemoryObj]], starts: Sequence[int],
        ends: Sequence[int], **kwargs,
    ) -> Generator[LayerTransfer, None, None]:
        """Store generator: ``memory_objs[layer][chunk]``; one ``next()`` per layer, then one more.

        Raises (at the first ``next()``): ValueError/TypeError on bad arguments; (at the last)
        ValueError on a slot outside the cache or a padding slot (no KV to store).
        """
        return self._store(_by_layer(memory_objs), starts, ends, kwargs)

    def batched_to_gpu(
        self, memory_objs: Optional[Sequence[Sequence[MemoryObj]]], starts: Sequence[int],
        ends: Sequence[int], **kwargs,
    ) -> Generator[Optional[LayerTransfer], Optional[Sequence[MemoryObj]], None]:
        """Retrieve generator: prime with ``next()``, then ``send(objs)`` per layer in layer order
        (or ``next()`` per layer when ``memory_objs[layer][chunk]`` was given), then
        ``next(gen, None)``.

        Raises: ValueError/TypeError on bad arguments (at the step that meets them); ValueError
        at the last step on a slot outside the cache (padding slots < 0 are skipped).
        """
        layers = None if memory_objs is None else _by_layer(memory_objs)
        return self._load(layers, starts, ends, kwargs)

    # ---- implementation ---------------------------------------------------------------
    def _one_layer(self, obj: MemoryObj, kwargs: dict) -> dict:
        layer = kwargs.get("layer_id")
        if not isinstance(layer, int) or not 0 <= layer < self.metadata.num_layers:
            raise ValueError(f"layer_id must be an int in [0, {self.metadata.num_layers}), "
                             f"got {layer!r}")
        return {layer: [obj]}

    def _prepare(self, starts, ends, kwargs):
        kvcaches = kwargs.get("kvcaches")
        self.validate_kvcaches(kvcaches)
        slot_mapping, offset = _slot_kwargs(kwargs)
        if len(starts) != len(ends):
            raise ValueError(f"got {len(starts)} starts but {len(ends)} ends")
        for start, end in zip(starts, ends):
            if not isinstance(start, int) or not isinstance(end, int) or not offset <= start <= end:
                raise ValueError(f"need ints offset={offset} <= start <= end, got {start!r}, {end!r}")
            if end - offset > slot_mapping.numel():
                raise ValueError(f"tokens [{start}, {end}) with offset {offset} exceed "
                                 f"slot_mapping's {slot_mapping.numel()} entries")
        kernels = self.backend == "cupy" and kvcaches[0].is_cuda
        return kvcaches, slot_mapping, offset, kernels

    def _check_objs(self, layer: int, objs: Sequence[MemoryObj], starts, ends,
                    kernels: bool) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.metadata.num_layers:
            raise ValueError(f"layer {layer!r} outside [0, {self.metadata.num_layers})")
        if objs is None or len(objs) != len(starts):
            raise ValueError(f"layer {layer}: need {len(starts)} MemoryObjs (one per chunk), "
                             f"got {None if objs is None else len(objs)}")
        for obj, start, end in zip(objs, starts, ends):
            want = self.get_shape(end - start)
            t = obj.tensor
            if t.shape != want or t.dtype != self.metadata.kv_dtype or obj.fmt != self.fmt:
                raise ValueError(
                    f"layer {layer}: MemoryObj for tokens [{start}, {end}) has shape "
                    f"{tuple(t.shape)} dtype {t.dtype} fmt {obj.fmt.name}; expected "
                    f"{tuple(want)} {self.metadata.kv_dtype} KV_T2D")
            if kernels and not t.is_cuda and not t.is_pinned():
                raise ValueError(f"layer {layer}: MemoryObj in pageable host memory; the layerwise "
                                 "kernel path needs pinned (mapped) or device memory")

    def _store(self, layers: dict, starts, ends, kwargs):
        kvcaches, slot_mapping, offset, kernels = self._prepare(starts, ends, kwargs)
        for layer, objs in layers.items():
            self._check_objs(layer, objs, starts, ends, kernels)
        slot_starts = [s - offset for s in starts]
        handles: list[TransferHandle] = []
        try:
            for layer, objs in layers.items():
                if kernels:
                    device = kvcaches[0].device
                    stream = self.streams.get(device)[0]
                    # the store reads this layer only after the compute that wrote it
                    stream.wait_stream(torch.cuda.current_stream(device))
                    handles.append(launch_transfer(
                        [kvcaches[layer]], self.layout, [o.tensor for o in objs], slot_mapping,
                        slot_starts, to_paged=False, single_layer=True, stream=stream))
                    yield LayerTransfer(layer, handles[-1])
                else:
                    self._torch_gather(kvcaches[layer], objs, slot_mapping, slot_starts)
                    yield LayerTransfer(layer)
        finally:
            _wait_all(handles, padding_is_error=True)

    def _load(self, layers: Optional[dict], starts, ends, kwargs):
        kvcaches, slot_mapping, offset, kernels = self._prepare(starts, ends, kwargs)
        slot_starts = [s - offset for s in starts]
        handles: list[TransferHandle] = []
        if kernels:
            device = kvcaches[0].device
            stream = self.streams.get(device)[1]
            stream.wait_stream(torch.cuda.current_stream(device))  # pages free of older compute
        try:
            received = yield None
            order = list(layers) if layers is not None else range(self.metadata.num_layers)
            for layer in order:
                objs = layers[layer] if layers is not None else received
                self._check_objs(layer, objs, starts, ends, kernels)
                if kernels:
                    handles.append(launch_transfer(
                        [kvcaches[layer]], self.layout, [o.tensor for o in objs], slot_mapping,
                        slot_starts, to_paged=True, single_layer=True, stream=stream))
                    result = LayerTransfer(layer, handles[-1])
                else:
                    self._torch_scatter(kvcaches[layer], objs, slot_mapping, slot_starts)
                    result = LayerTransfer(layer)
                received = yield result
        finally:
            _wait_all(handles, padding_is_error=False)

    def _gather_slots(self, slot_mapping, slot_starts, objs, device) -> torch.Tensor:
        parts = [slot_mapping[s:s + o.tensor.shape[0]] for s, o in zip(slot_starts, objs)]
        return torch.cat(parts).to(device=device, dtype=torch.int64) if parts else \
            torch.empty(0, dtype=torch.int64, device=device)

    def _check_slots(self, slots: torch.Tensor, layer_tensor, allow_padding: bool) -> None:
        if slots.numel():
            lo, hi = (int(v) for v in torch.aminmax(slots))
            num_slots = self.layout.num_slots(layer_tensor)
            if lo < (-1 if allow_padding else 0) or hi >= num_slots:
                raise ValueError(f"slot_mapping holds slots in [{lo}, {hi}]; valid slots are "
                                 f"[{-1 if allow_padding else 0}, {num_slots - 1}]")

    def _torch_gather(self, layer_tensor, objs, slot_mapping, slot_starts) -> None:
        slots = self._gather_slots(slot_mapping, slot_starts, objs, layer_tensor.device)
        self._check_slots(slots, layer_tensor, allow_padding=False)
        kv = gather_kv([layer_tensor], slots, self.layout)[:, 0].transpose(0, 1)  # [T, kv, HD]
        pos = 0
        for obj in objs:
            n = obj.tensor.shape[0]
            obj.tensor.copy_(kv[pos:pos + n])
            pos += n

    def _torch_scatter(self, layer_tensor, objs, slot_mapping, slot_starts) -> None:
        slots = self._gather_slots(slot_mapping, slot_starts, objs, layer_tensor.device)
        self._check_slots(slots, layer_tensor, allow_padding=True)
        if not objs:
            return
        kv = torch.cat([o.tensor for o in objs]).transpose(0, 1).unsqueeze(1)  # [kv, 1, T, HD]
        scatter_kv([layer_tensor], slots, self.layout, kv)


def _by_layer(memory_objs) -> dict:
    """``{layer: [MemoryObj per chunk]}``; a flat list of MemoryObjs (what the all-layers engine
    path passes) is a TypeError, raised at the call, not at the first ``next()``."""
    if not isinstance(memory_objs, (list, tuple)) or any(
        isinstance(row, MemoryObj) or not isinstance(row, (list, tuple)) for row in memory_objs
    ):
        raise TypeError(
            "VLLMPagedMemLayerwiseGPUConnector moves one layer at a time: memory_objs must be "
            "memory_objs[layer][chunk] (LMCacheEngine.store_layer / retrieve_layer), got "
            f"{memory_objs!r:.120}")
    return dict(enumerate(memory_objs))


def _wait_all(handles: Sequence[TransferHandle], padding_is_error: bool) -> None:
    """Wait for every handle (so no object is released while a kernel uses it), then raise
    the first error (ValueError: slot outside the cache; padding in a store)."""
    error: Optional[Exception] = None
    for handle in handles:
        try:
            handle.wait()
            if padding_is_error and handle.saw_padding:
                raise ValueError("slot_mapping holds padding slots (< 0) in a stored range: "
                                 "padding has no KV to store")
        except ValueError as err:
            error = error or err
    if error is not None:
        raise error
