"""VLLMBufferLayerwiseGPUConnector: CacheBlend's per-layer KV buffer (LMCache's name).

CacheBlend reuses the KV of segments (documents) that were stored at other positions. Per
layer this connector assembles one contiguous buffer for the whole prompt::

    buffer [2, N, H, D]  (index 0 = K, 1 = V; N = prompt tokens, H = KV heads, D = head size)

in which every reused segment's K/V sits at its NEW token range, its K re-positioned by
:class:`lmcache.blend.rotary.FusedRotaryEmb` from the positions it was computed at to the new
ones, and every other token (separators, segments not cached, the question) is zero — LMCache's
gap rule (``VLLMBufferLayerwiseGPUConnector.batched_to_gpu`` zeroes the tokens no retrieved
chunk covers, after RoPE). The Blender recomputes what it needs and writes the finished layer
into vLLM's paged cache with :meth:`write_layer`: on CUDA with CuPy one launch of
``csrc/vllm_layerwise.cu`` on the current stream (no host sync; slots outside the cache are
skipped by the kernel and reported by :meth:`wait_writes`), otherwise the paged-write code of
``kv_transfer`` (synchronous checks).

Double buffering (:meth:`load_layers`): two buffers alternate; when layer i is yielded, layer
i+1's copy, re-positioning and gap zeroing are already enqueued (on CUDA on a load stream that
the compute stream waits on through an event: the host never blocks). A yielded buffer is
valid until the next ``next()``; layer i+2 then reuses it (the load stream first waits for the
work the caller enqueued on the compute stream until that ``next()``). On CPU the same
generator runs synchronously.

Store side: :meth:`gather_segment` copies a segment's K/V of every layer out of the paged cache
(``kv_transfer.gather_kv``) into a stored chunk's ``[L, 2, T, H*D]`` view
(:class:`lmcache.blend.blend_chunk.BlendChunkFormat`).
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from typing import Any, Optional

import torch

from lmcache.blend.rotary import FusedRotaryEmb
from lmcache.gpu_connector.base import GPUConnectorInterface
from lmcache.gpu_connector.cupy_kernels import cupy_available
from lmcache.gpu_connector.kv_layout import KVCacheLayout, check_layer_tensors
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv
from lmcache.gpu_connector.vllm_paged import _slot_kwargs
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata


class VLLMBufferLayerwiseGPUConnector(GPUConnectorInterface):
    """Per-layer CacheBlend buffer between stored segments and vLLM's paged cache.

    Args:
        metadata: the worker's LMCacheMetadata (layers, heads, head size, KV dtype; not MLA).
        layout: the paged layer tensors' KVCacheLayout (injected by the vLLM integration).
        rope_parameters: the model's ``rope_parameters`` as vLLM's ``get_rope`` reads them
            (``rope_theta``, ``rope_type``, scaling keys); builds the FusedRotaryEmb.
        is_neox_style: RoPE style of the model (True for Llama / Qwen).
        rotary: a ready FusedRotaryEmb (overrides ``rope_parameters``). With neither,
            :meth:`load_layers` raises ValueError (K cannot be moved without the model's RoPE).
        device: where buffers live; None = ``cuda`` when available, else ``cpu``.

    Raises:
        TypeError / ValueError: wrong types, MLA, a layout disagreeing with the metadata, an
            unsupported RoPE (named by FusedRotaryEmb).
    """

    def __init__(self, metadata: LMCacheMetadata, layout: KVCacheLayout,
                 rope_parameters: Optional[Mapping[str, Any]] = None, is_neox_style: bool = True,
                 rotary: Optional[FusedRotaryEmb] = None, device: Optional[str] = None) -> None:
        if not isinstance(metadata, LMCacheMetadata):
            raise TypeError(f"metadata must be LMCacheMetadata, got {type(metadata).__name__}")
        if not isinstance(layout, KVCacheLayout):
            raise TypeError(f"layout must be KVCacheLayout, got {type(layout).__name__}")
        if metadata.use_mla or layout.is_mla:
            raise ValueError("VLLMBufferLayerwiseGPUConnector needs separate K and V; MLA "
                             "(use_mla / layout mla) is not supported")
        if (layout.num_kv_heads, layout.head_size) != (metadata.num_kv_heads, metadata.head_size):
            raise ValueError(f"layout {layout} disagrees with metadata kv_shape "
                             f"{metadata.kv_shape}")
        if rotary is not None and not isinstance(rotary, FusedRotaryEmb):
            raise TypeError(f"rotary must be a FusedRotaryEmb, got {type(rotary).__name__}")
        if rotary is None and rope_parameters is not None:
            rotary = FusedRotaryEmb.from_rope_parameters(metadata.head_size, rope_parameters,
                                                         is_neox_style=is_neox_style)
        if rotary is not None and rotary.head_size != metadata.head_size:
            raise ValueError(f"rotary head_size {rotary.head_size} != metadata head_size "
                             f"{metadata.head_size}")
        self.metadata, self.layout, self.rotary = metadata, layout, rotary
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.fmt = MemoryFormat.KV_2TD
        self._load_streams: dict[int, torch.cuda.Stream] = {}
        #: CUDA paged writes through the CuPy kernel (False: kv_transfer's torch path).
        self.write_kernel = True
        self._writes: list = []  # TransferHandles of kernel writes not yet checked

    def get_shape(self, num_tokens: int) -> torch.Size:
        """``[2, num_tokens, H*D]``: one layer's buffer (LMCache's KV_2TD)."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        return torch.Size((2, num_tokens, self.metadata.hidden_dim))

    def validate_kvcaches(self, kvcaches: object) -> None:
        """One tensor per layer, each of the layout's shape, ``kv_dtype`` and block count."""
        super().validate_kvcaches(kvcaches)
        check_layer_tensors(kvcaches, self.layout, self.metadata.kv_shape, self.metadata.kv_dtype)

    def from_gpu(self, memory_obj, start: int, end: int, **kwargs) -> None:
        """Not a chunk connector: stored segments are written with :meth:`gather_segment`."""
        raise TypeError("VLLMBufferLayerwiseGPUConnector stores whole segments: use "
                        "gather_segment (LMCacheEngine.store with the blend data path)")

    def to_gpu(self, memory_obj, start: int, end: int, **kwargs) -> None:
        """Not a chunk connector: segments are loaded with :meth:`load_layers`."""
        raise TypeError("VLLMBufferLayerwiseGPUConnector loads per layer: use load_layers "
                        "(LMCacheEngine.retrieve_layers_for_blend)")

    # ---- store ------------------------------------------------------------------------
    def gather_segment(self, out: torch.Tensor, start: int, end: int, **kwargs) -> None:
        """Copy tokens ``[start, end)`` of every layer out of the paged cache into ``out``.

        Args:
            out: ``[L, 2, end - start, H*D]`` of ``kv_dtype`` (a BlendChunkFormat KV view).
            kwargs: ``kvcaches`` (L paged tensors), ``slot_mapping`` (int, -1 = padding),
                ``offset`` (tokens before slot_mapping[0], default 0).

        Raises:
            ValueError: bad kvcaches / slots / range, a padding slot in the range (no KV), or
                ``out`` of the wrong shape / dtype.
        """
        kvcaches = kwargs.get("kvcaches")
        self.validate_kvcaches(kvcaches)
        slots = self._slots(start, end, kwargs)
        if slots.numel() and int(slots.min()) < 0:
            raise ValueError(f"slot_mapping holds padding slots (< 0) in tokens [{start}, {end}):"
                             " padding has no KV to store")
        md = self.metadata
        want = (md.num_layers, 2, end - start, md.hidden_dim)
        if tuple(out.shape) != want or out.dtype != md.kv_dtype:
            raise ValueError(f"out has shape {tuple(out.shape)} dtype {out.dtype}; expected "
                             f"{want} {md.kv_dtype}")
        gather_kv(kvcaches, slots, self.layout, out=out.permute(1, 0, 2, 3))

    # ---- load -------------------------------------------------------------------------
    def load_layers(self, sources: Sequence[torch.Tensor], starts: Sequence[int],
                    ends: Sequence[int], old_starts: Sequence[int], new_positions: torch.Tensor,
                    device: Optional[torch.device] = None,
                    rotary: Optional[FusedRotaryEmb] = None
                    ) -> Generator[torch.Tensor, None, None]:
        """Generator of L buffers ``[2, N, H, D]`` (layer order), double-buffered.

        Args:
            sources: per reused segment, its stored KV ``[L, 2, T, H*D]`` of ``kv_dtype`` (any
                device; pinned host memory makes the CUDA copies asynchronous).
            starts, ends: each segment's NEW token range in the prompt (``end - start == T``),
                ascending, not overlapping.
            old_starts: the position each segment's first token was computed at (stored).
            new_positions: int ``[N]``, the position of every prompt token now (vLLM: arange).
            device: buffer device (default: the connector's).
            rotary: the RoPE that re-positions K for this call (the Blender passes its
                model's); None = the connector's own (from ``rope_parameters``).

        Yields:
            layer i's buffer (``kv_dtype``, on ``device``): K re-positioned, gaps zero. Valid
            until the next ``next()`` (module docstring); copy it to keep it.

        Raises (at the call): ValueError naming the bad argument, or no RoPE (neither
        ``rotary`` nor the connector's own).
        """
        dev = torch.device(device) if device is not None else self.device
        rotary = self.rotary if rotary is None else rotary
        if rotary is not None and (not isinstance(rotary, FusedRotaryEmb)
                                   or rotary.head_size != self.metadata.head_size):
            raise ValueError(f"rotary must be a FusedRotaryEmb of head_size "
                             f"{self.metadata.head_size}, got {rotary!r:.80}")
        n = self._check_load(sources, starts, ends, old_starts, new_positions, rotary)
        new_pos = new_positions.to(device=dev, dtype=torch.int64)
        old_pos = new_pos.clone()  # gaps: old == new, no rotation; zeroed afterwards
        gaps, prev = [], 0  # token ranges no segment covers: zeroed (memset per range)
        for s, e, o in zip(starts, ends, old_starts):
            old_pos[s:e] = torch.arange(o, o + e - s, device=dev)
            gaps += [(prev, s)] if s > prev else []
            prev = e
        gaps += [(prev, n)] if n > prev else []
        spans = [(s, e) for s, e in zip(starts, ends)]
        return self._pipeline(list(sources), spans, old_pos, new_pos, gaps, n, dev, rotary)

    def _check_load(self, sources, starts, ends, old_starts, new_positions, rotary) -> int:
        if rotary is None:
            raise ValueError("VLLMBufferLayerwiseGPUConnector has no RoPE: give rope_parameters "
                             "(the model's) or rotary, else cached K cannot be re-positioned")
        if not isinstance(new_positions, torch.Tensor) or new_positions.dim() != 1 \
                or new_positions.dtype.is_floating_point or new_positions.dtype == torch.bool:
            raise ValueError("new_positions must be a 1-D integer tensor, got "
                             f"{new_positions!r:.80}")
        n = new_positions.numel()
        if not len(sources) == len(starts) == len(ends) == len(old_starts):
            raise ValueError(f"need one start, end, old_start per source; got {len(sources)} "
                             f"sources, {len(starts)}, {len(ends)}, {len(old_starts)}")
        md, prev = self.metadata, 0
        for src, s, e, o in zip(sources, starts, ends, old_starts):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (s, e, o)) \
                    or not prev <= s < e <= n or o < 0:
                raise ValueError(f"segment [{s}, {e}) old start {o!r}: need ascending, "
                                 f"non-overlapping ranges within [0, {n}) and old start >= 0")
            want = (md.num_layers, 2, e - s, md.hidden_dim)
            if tuple(src.shape) != want or src.dtype != md.kv_dtype:
                raise ValueError(f"source for tokens [{s}, {e}) has shape {tuple(src.shape)} "
                                 f"dtype {src.dtype}; expected {want} {md.kv_dtype}")
            prev = e
        return n

    def _pipeline(self, sources, spans, old_pos, new_pos, gaps, n, dev, rotary):
        md = self.metadata
        bufs = [torch.empty((2, n, md.hidden_dim), dtype=md.kv_dtype, device=dev)
                for _ in range(2 if md.num_layers > 1 else 1)]
        cuda = dev.type == "cuda"
        stream = self._load_stream(dev) if cuda else None
        events: list[Optional[torch.cuda.Event]] = [None] * md.num_layers
        # the positions are those of every layer: the rotation is computed once per request
        rotation = rotary.rotation(old_pos, new_pos, dev) if spans else None

        def load(layer: int) -> None:
            buf = bufs[layer % len(bufs)]
            if cuda:
                stream.wait_stream(torch.cuda.current_stream(dev))  # earlier users of buf
                with torch.cuda.stream(stream):
                    self._fill(buf, layer, sources, spans, rotation, gaps, rotary)
                    events[layer] = torch.cuda.Event()
                    events[layer].record(stream)
            else:
                self._fill(buf, layer, sources, spans, rotation, gaps, rotary)

        try:
            load(0)
            for layer in range(md.num_layers):
                if layer + 1 < md.num_layers:
                    load(layer + 1)
                if cuda:
                    torch.cuda.current_stream(dev).wait_event(events[layer])
                yield bufs[layer % len(bufs)].view(2, n, md.num_kv_heads, md.head_size)
        finally:
            if cuda:
                stream.synchronize()  # no copy may still read a source the caller releases

    def _fill(self, buf, layer, sources, spans, rotation, gaps, rotary) -> None:
        for src, (s, e) in zip(sources, spans):
            layer_src = src[layer]
            buf[0, s:e].copy_(layer_src[0], non_blocking=True)
            buf[1, s:e].copy_(layer_src[1], non_blocking=True)
        if spans:
            rotary.rotate(buf[0], *rotation)
        for s, e in gaps:
            buf[:, s:e] = 0

    def _load_stream(self, dev: torch.device) -> torch.cuda.Stream:
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index not in self._load_streams:
            self._load_streams[index] = torch.cuda.Stream(index)
        return self._load_streams[index]

    # ---- paged write ------------------------------------------------------------------
    def write_layer(self, kv: torch.Tensor, layer_tensor: torch.Tensor,
                    token_mask: Optional[torch.Tensor] = None, **kwargs) -> None:
        """Write a finished layer ``kv`` into one paged layer tensor of vLLM.

        Args:
            kv: ``[2, N, H, D]`` or ``[2, N, H*D]`` of ``kv_dtype`` (token i = prompt token i).
            layer_tensor: that layer's paged tensor (the layout's shape).
            token_mask: optional bool ``[N]``: only those tokens are written.
            kwargs: ``slot_mapping`` (int, -1 = padding: skipped), ``offset`` (tokens before
                slot_mapping[0]; those are not written).

        On a CUDA layer with CuPy the write is enqueued on the current stream and returns at
        once; call :meth:`wait_writes` (once, after the last layer) to learn about slots
        outside the cache (those tokens were skipped).

        Raises:
            ValueError: wrong shapes / dtype, slots outside the cache (torch path; the
                kernel path reports them from :meth:`wait_writes`, or from a later call).
        """
        md = self.metadata
        self.layout.check_tensor(layer_tensor, md.kv_dtype)
        shapes = ((2, -1, md.num_kv_heads, md.head_size), (2, -1, md.hidden_dim))
        n = kv.shape[1] if kv.dim() in (3, 4) else -1
        if kv.dtype != md.kv_dtype or not any(
                kv.dim() == len(s) and all(a == b or b == -1 for a, b in zip(kv.shape, s))
                for s in shapes):
            raise ValueError(f"kv must be [2, N, {md.num_kv_heads}, {md.head_size}] "
                             f"{md.kv_dtype}, got {tuple(kv.shape)} {kv.dtype}")
        offset = kwargs.get("offset", 0)
        slots = self._slots(offset, n, kwargs).to(layer_tensor.device)
        flat = kv.reshape(2, n, md.hidden_dim)[:, offset:]
        if token_mask is not None:
            if token_mask.dtype != torch.bool or tuple(token_mask.shape) != (n,):
                raise ValueError(f"token_mask must be bool [{n}], got {token_mask!r:.80}")
            keep = token_mask[offset:].to(slots.device)
            slots = torch.where(keep, slots, torch.full_like(slots, -1))
        if layer_tensor.is_cuda and self.write_kernel and cupy_available():
            from lmcache.gpu_connector.cupy_kernels import launch_transfer  # noqa: PLC0415

            self._check_writes(block=False)
            self._writes.append(launch_transfer(
                [layer_tensor], self.layout, [flat.permute(1, 0, 2)], slots, [0], to_paged=True,
                single_layer=True))
            return
        if slots.numel() and int(slots.max()) >= self.layout.num_slots(layer_tensor):
            raise ValueError(f"slot_mapping holds slot {int(slots.max())}; the layer has "
                             f"{self.layout.num_slots(layer_tensor)} slots")
        scatter_kv([layer_tensor], slots, self.layout, flat.unsqueeze(1))

    def wait_writes(self) -> None:
        """Block until every kernel write of :meth:`write_layer` finished and check its slots.

        Raises:
            ValueError: a write met a slot outside the cache (that token was not written).
        """
        self._check_writes(block=True)

    def _check_writes(self, block: bool) -> None:
        pending, self._writes = self._writes, []
        error = None
        for i, handle in enumerate(pending):
            if not block and not handle.query():
                self._writes = pending[i:]
                break
            try:
                handle.wait()
            except ValueError as exc:
                error = error or exc
        if error is not None:
            raise error

    def _slots(self, start: int, end: int, kwargs: dict) -> torch.Tensor:
        slot_mapping, offset = _slot_kwargs(kwargs)
        if not (isinstance(start, int) and isinstance(end, int) and offset <= start <= end
                and end - offset <= slot_mapping.numel()):
            raise ValueError(f"tokens [{start!r}, {end!r}) with offset {offset} need offset <= "
                             f"start <= end and slot_mapping entries up to {end - offset} "
                             f"(it has {slot_mapping.numel()})")
        return slot_mapping[start - offset:end - offset].to(torch.int64)
