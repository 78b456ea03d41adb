"""Torch reference of the paged KV transfer (lmc_ops.multi_layer_kv_transfer).

``gather_kv`` copies the KV of a list of slots out of every layer's paged tensor into one
``[2, L, T, H*D]`` tensor (MLA: ``[1, L, T, D]``); ``scatter_kv`` writes such a tensor back.
Both are pure torch (vectorised advanced indexing, one gather / one index_put per layer, no
per-token Python loop), run on CPU and CUDA tensors alike, and are the bit-for-bit reference
the CUDA kernels in ``csrc/`` are checked against. Layout facts: ``KVCacheLayout``
(DESIGN.md §4.6); output format: MemoryFormat KV_2LTD / KV_MLA_FMT (DESIGN.md §4.4).

Semantics the kernels must match:
- token t of the output is the KV of slot ``slots[t]`` (block ``slots[t] // N``, offset
  ``slots[t] % N``); output row order is the order of ``slots``;
- ``gather_kv``: a slot < 0 (padding) yields zeros for that token;
- ``scatter_kv``: a slot < 0 is skipped (its paged memory is not touched); slots must be unique;
- KV moves as bit patterns (each tensor viewed as the integer dtype of its element size), so
  every KV cache dtype (bf16/fp16/fp32, fp8 e4m3/e5m2, int8, uint8, ...) round-trips bit-exactly,
  including dtypes torch has no indexing kernels for on the device (float8 on CPU).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from typing import Optional

import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout


def kv_out_shape(layout: KVCacheLayout, num_layers: int, num_tokens: int) -> torch.Size:
    """Shape of the gathered tensor: ``[2, L, T, H*D]``, MLA ``[1, L, T, D]``."""
    first = 1 if layout.is_mla else 2
    return torch.Size((first, num_layers, num_tokens, layout.hidden_dim))


def _paged_view(tensor: torch.Tensor, layout: KVCacheLayout) -> torch.Tensor:
    """A view of one layer with an explicit K/V axis, indexable by ``_indices``."""
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    if layout.kind == "cpu_packed":
        # page [N, 2D] read as [2N, D] = [2, N, D]: rows 0..N-1 K, N..2N-1 V.
        return tensor.view(tensor.shape[0], h, 2, n, d)
    if layout.kind == "flash_packed":
        # last dim C = [K (D) | V (D)].
        return tensor.view(tensor.shape[0], h, n, 2, d)
    return tensor  # legacy_5d [2, B, N, H, D], mla [B, N, D]


def _indices(slots: torch.Tensor, layout: KVCacheLayout) -> tuple[torch.Tensor, ...]:
    """Broadcast index tensors selecting ``[2, T, H]`` (MLA: ``[1, T]``) rows of the view."""
    n = layout.block_size
    block = torch.div(slots, n, rounding_mode="floor")
    off = slots - block * n
    dev = slots.device
    if layout.kind == "mla":
        return block[None, :], off[None, :]
    kv = torch.arange(2, device=dev)
    if layout.kind == "legacy_5d":
        return kv[:, None], block[None, :], off[None, :]
    head = torch.arange(layout.num_kv_heads, device=dev)[None, None, :]
    b, o, k = block[None, :, None], off[None, :, None], kv[:, None, None]
    if layout.kind == "cpu_packed":
        return b, head, k, o
    return b, head, o, k  # flash_packed


def _flat_rows(slots: torch.Tensor, layout: KVCacheLayout, tensor: torch.Tensor) -> torch.Tensor:
    """Row numbers of ``tensor.view(-1, D)`` holding the KV of ``slots``: ``[2, T, H]`` (MLA ``[1, T]``).

    Valid only for a contiguous layer tensor; row order matches ``gather_kv``'s output.
    """
    n, h = layout.block_size, layout.num_kv_heads
    block = torch.div(slots, n, rounding_mode="floor")
    off = slots - block * n
    if layout.kind == "mla":
        return (block * n + off)[None, :]
    dev = slots.device
    k = torch.arange(2, device=dev)[:, None, None]
    head = torch.arange(h, device=dev)[None, None, :]
    b, o = block[None, :, None], off[None, :, None]
    if layout.kind == "cpu_packed":  # [B, H, 2, N, D]
        return ((b * h + head) * 2 + k) * n + o
    if layout.kind == "flash_packed":  # [B, H, N, 2, D]
        return ((b * h + head) * n + o) * 2 + k
    num_blocks = tensor.shape[1]  # legacy_5d [2, B, N, H, D]
    return ((k * num_blocks + b) * n + o) * h + head


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` reinterpreted (a view, no copy) as the integer dtype of its element size.

    KV moves as bit patterns: every dtype a KV cache may have (bf16/fp16/fp32, fp8 e4m3/e5m2,
    int8, uint8, ...) takes the same integer path, bit-exactly, even where torch has no
    kernel for the dtype itself (e.g. ``masked_fill`` / ``index_put_`` on float8 on CPU).
    """
    bits = _BITS.get(tensor.element_size())
    if bits is None or tensor.dtype == bits:
        return tensor
    return tensor.view(bits)


def _as_slots(slots: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(slots, torch.Tensor) or slots.dim() != 1:
        raise ValueError(f"slots must be a 1-D integer tensor, got {slots!r}")
    if slots.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"slots must have an integer dtype, got {slots.dtype}")
    return slots.to(device=device, dtype=torch.int64)


def _page_map_index(slots: torch.Tensor, layout: KVCacheLayout) -> torch.Tensor:
    """Element positions in ``layer.view(-1)`` of the KV of ``slots``: ``[2, T, H*D]``.

    For a cpu_packed layout with a ``page_map`` (the per-page element order of vLLM's CPU
    cache-write kernel); row order matches ``gather_kv``'s output.
    """
    n, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    pm = layout.page_map.to(slots.device)
    block = torch.div(slots, n, rounding_mode="floor")
    off = slots - block * n
    heads = torch.arange(h, device=slots.device)
    base = (block[:, None] * h + heads[None, :]) * (2 * n * d)  # [T, H] page starts
    idx = base[None, :, :, None] + pm[:, off][:, :, None, :]  # [2, T, H, D]
    return idx.reshape(2, slots.numel(), h * d)


_PATTERNS: dict[int, tuple] = {}  # id(page_map) -> (weakref to it, patterns)
_SCRATCH = threading.local()


def _page_patterns(layout: KVCacheLayout) -> Optional[tuple[str, str]]:
    """How each half (K, V) of a page_map page is ordered: ``"rows"`` (token-major ``[N, D]``:
    a token's D elements contiguous) or ``"cols"`` (dim-major ``[D, N]``, vLLM's ``vec`` ISA K);
    None when a half is neither (then elements are moved one by one). Cached per page_map."""
    pm = layout.page_map
    hit = _PATTERNS.get(id(pm))
    if hit is not None and hit[0]() is pm:
        return hit[1]
    n, d = layout.block_size, layout.head_size
    o = torch.arange(n, device=pm.device)[:, None]
    e = torch.arange(d, device=pm.device)[None, :]
    found: Optional[tuple[str, str]] = ()
    for kv in range(2):
        base = kv * n * d
        if torch.equal(pm[kv], base + o * d + e):
            found += ("rows",)
        elif torch.equal(pm[kv], base + e * n + o):
            found += ("cols",)
        else:
            found = None
            break
    if len(_PATTERNS) > 64:
        _PATTERNS.clear()
    _PATTERNS[id(pm)] = (weakref.ref(pm), found)
    return found


def scratch_buffer(slot: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer (per thread, device and ``slot``: 0 and 1 are kv_transfer's own) of
    ``shape``/``dtype``, valid until the next call with the same slot: fresh memory costs page
    faults that take longer than the copy itself on small hosts."""
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    nbytes = math.prod(shape) * dtype.itemsize
    key = (slot, str(device))
    buf = pool.get(key)
    if buf is None or buf.numel() < nbytes:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = pool[key] = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, device=device)
    return buf[:nbytes].view(dtype).view(shape)


class _PagePlan:
    """Row-wise plan of a page_map transfer of ``slots`` (>= 0): token-major halves move D-element
    rows (one index per (token, head)); dim-major halves move whole half-pages of the touched
    blocks (``ub``) and transpose them in memory; ``pos`` = each token's row among the touched
    blocks' tokens (``arange(T)`` when the slots are whole blocks in order: ``aligned``)."""

    def __init__(self, slots: torch.Tensor, layout: KVCacheLayout, patterns: tuple[str, str]):
        n, h = layout.block_size, layout.num_kv_heads
        self.n, self.h, self.d = n, h, layout.head_size
        self.patterns = patterns
        t = slots.numel()
        block = torch.div(slots, n, rounding_mode="floor")
        off = slots - block * n
        heads = torch.arange(h, device=slots.device)
        self.rows = [None, None]
        for kv in range(2):
            if patterns[kv] == "rows":  # row of D elements in tensor.view(-1, D)
                self.rows[kv] = (((block[:, None] * h + heads[None, :]) * 2 + kv) * n
                                 + off[:, None]).reshape(-1)
        if "cols" not in patterns:
            return
        self.aligned = False
        if t % n == 0:  # whole blocks in order (vLLM's usual chunk): no sort needed
            first = slots[::n]
            if bool((first % n == 0).all()) and torch.equal(
                    (slots.view(-1, n) - first[:, None]),
                    torch.arange(n, device=slots.device).expand(t // n, n)):
                self.ub = torch.div(first, n, rounding_mode="floor")
                self.aligned = self.full = True
                return
        self.ub, inv = torch.unique(block, return_inverse=True)
        self.pos = inv * n + off
        self.full = self.ub.numel() * n == t  # every touched block wholly covered

    def half(self, tensor: torch.Tensor, kv: int) -> torch.Tensor:
        """``[B, H, N*D]`` view of half ``kv`` of every page of one layer."""
        return tensor.view(tensor.shape[0], self.h, 2, self.n * self.d)[:, :, kv]

    def _pages(self, tensor: torch.Tensor, kv: int) -> torch.Tensor:
        """Half ``kv`` of the touched pages, ``[U, H, D, N]`` (a scratch buffer)."""
        u, n, h, d = self.ub.numel(), self.n, self.h, self.d
        sel = scratch_buffer(0, (u, h, n * d), tensor.dtype, tensor.device)
        torch.index_select(self.half(tensor, kv), 0, self.ub, out=sel)
        return sel.view(u, h, d, n)

    def gather(self, tensor: torch.Tensor, kv: int, dst: torch.Tensor) -> None:
        """Write half ``kv`` of the slots' KV of one layer into ``dst`` ``[T, H*D]``."""
        if self.patterns[kv] == "rows":
            torch.index_select(tensor.view(-1, self.d), 0, self.rows[kv],
                               out=dst.view(-1, self.d))
            return
        u, n, h, d = self.ub.numel(), self.n, self.h, self.d
        tokens = self._pages(tensor, kv).permute(0, 3, 1, 2)  # [U, N, H, D]
        if self.aligned:
            dst.view(u, n, h, d).copy_(tokens)
            return
        rows = scratch_buffer(1, (u * n, h * d), tensor.dtype, tensor.device)
        rows.view(u, n, h, d).copy_(tokens)
        torch.index_select(rows, 0, self.pos, out=dst)

    def scatter(self, tensor: torch.Tensor, kv: int, src: torch.Tensor) -> None:
        """Write ``src`` ``[T, H*D]`` into half ``kv`` of the slots of one layer."""
        if self.patterns[kv] == "rows":
            tensor.view(-1, self.d).index_copy_(0, self.rows[kv], src.reshape(-1, self.d))
            return
        u, n, h, d = self.ub.numel(), self.n, self.h, self.d
        if self.aligned:
            tokens = src.reshape(u, n, h, d)
        else:
            rows = scratch_buffer(1, (u * n, h * d), tensor.dtype, tensor.device)
            if not self.full:  # partly covered blocks: keep their other tokens
                rows.view(u, n, h, d).copy_(self._pages(tensor, kv).permute(0, 3, 1, 2))
            rows.index_copy_(0, self.pos, src)
            tokens = rows.view(u, n, h, d)
        pages = scratch_buffer(0, (u, h, d, n), tensor.dtype, tensor.device)
        pages.copy_(tokens.permute(0, 2, 3, 1))
        self.half(tensor, kv).index_copy_(0, self.ub, pages.view(u, h, n * d))


def _require_contiguous(layer_tensors: Sequence[torch.Tensor], layout: KVCacheLayout) -> None:
    if not all(t.is_contiguous() for t in layer_tensors):
        raise ValueError(f"layout {layout.kind} with a page_map needs contiguous layer tensors")


def gather_kv(
    layer_tensors: Sequence[torch.Tensor],
    slots: torch.Tensor,
    layout: KVCacheLayout,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather the KV of ``slots`` from every layer.

    Args:
        layer_tensors: L paged tensors (one per layer) of ``layout``, same device and dtype.
        slots: int tensor ``[T]`` of flat slots (block_id * block_size + offset); < 0 = padding.
        layout: the layer tensors' layout.
        out: optional destination ``[2, L, T, H*D]`` (MLA ``[1, L, T, D]``) of the same dtype,
            any device; written in place and returned.

    Returns:
        ``[2, L, T, H*D]`` (MLA ``[1, L, T, D]``), dtype of the layers; on the layers' device
        unless ``out`` is given. Row t of K is ``H`` heads of ``D`` each, head-major.

    Raises:
        ValueError: ``out`` has the wrong shape or dtype, or ``slots`` is not 1-D integer.
    """
    ref = layer_tensors[0]
    slots = _as_slots(slots, ref.device)
    shape = kv_out_shape(layout, len(layer_tensors), slots.numel())
    if out is None:
        out = torch.empty(shape, dtype=ref.dtype, device=ref.device)
    elif out.shape != shape or out.dtype != ref.dtype:
        raise ValueError(
            f"gather_kv out has shape {tuple(out.shape)} dtype {out.dtype}, "
            f"expected {tuple(shape)} dtype {ref.dtype}"
        )
    if slots.numel() == 0:
        return out
    result, out = out, _bits(out)
    layer_tensors = [_bits(t) for t in layer_tensors]
    ref = layer_tensors[0]
    pad = slots < 0
    has_pad = bool(pad.any())
    safe = slots.clamp(min=0) if has_pad else slots
    if layout.page_map is not None:
        _require_contiguous(layer_tensors, layout)
        patterns = _page_patterns(layout)
        if patterns is not None and out.device == ref.device and out.is_contiguous():
            plan = _PagePlan(safe, layout, patterns)
            for layer, tensor in enumerate(layer_tensors):
                for kv in range(2):
                    plan.gather(tensor, kv, out[kv, layer])
        else:
            idx = _page_map_index(safe, layout)
            for layer, tensor in enumerate(layer_tensors):
                flat = tensor.view(-1)
                for kv in range(2):
                    out[kv, layer].copy_(flat.index_select(0, idx[kv].reshape(-1)).view(shape[2], shape[3]))
    elif all(t.is_contiguous() for t in layer_tensors):
        # One index_select of whole D-element rows per (K/V, layer): row copies, not
        # element-wise advanced indexing (~50x faster on CPU).
        rows = _flat_rows(safe, layout, ref).reshape(shape[0], -1)
        width = layout.head_size if layout.kind != "mla" else shape[3]
        for layer, tensor in enumerate(layer_tensors):
            flat = tensor.view(-1, width)
            for kv in range(shape[0]):
                dst = out[kv, layer]
                if dst.device == flat.device and dst.is_contiguous():
                    torch.index_select(flat, 0, rows[kv], out=dst.view(-1, width))
                else:
                    dst.copy_(flat.index_select(0, rows[kv]).view(shape[2], shape[3]))
    else:
        idx = _indices(safe, layout)
        for layer, tensor in enumerate(layer_tensors):
            rows = _paged_view(tensor, layout)[idx]  # [2, T, H, D] / [1, T, D]
            out[:, layer].copy_(rows.view(shape[0], shape[2], shape[3]))
    if has_pad:
        out[:, :, pad.to(out.device)] = 0
    return result


def scatter_kv(
    layer_tensors: Sequence[torch.Tensor],
    slots: torch.Tensor,
    layout: KVCacheLayout,
    kv: torch.Tensor,
) -> None:
    """Write ``kv`` into the paged tensors at ``slots`` (inverse of ``gather_kv``).

    Args:
        layer_tensors: L paged tensors of ``layout`` (modified in place).
        slots: int tensor ``[T]`` of unique flat slots; slots < 0 are skipped.
        layout: the layer tensors' layout.
        kv: ``[2, L, T, H*D]`` (MLA ``[1, L, T, D]``), dtype of the layers, any device
            (moved to the layers' device once).

    Raises:
        ValueError: ``kv`` has the wrong shape or dtype, or ``slots`` is not 1-D integer.
    """
    ref = layer_tensors[0]
    slots = _as_slots(slots, ref.device)
    shape = kv_out_shape(layout, len(layer_tensors), slots.numel())
    if kv.shape != shape or kv.dtype != ref.dtype:
        raise ValueError(
            f"scatter_kv kv has shape {tuple(kv.shape)} dtype {kv.dtype}, "
            f"expected {tuple(shape)} dtype {ref.dtype}"
        )
    kv = _bits(kv.to(ref.device))  # blocking: the caller may free the source right after
    layer_tensors = [_bits(t) for t in layer_tensors]
    ref = layer_tensors[0]
    keep = slots >= 0
    if not bool(keep.all()):
        kept = keep.nonzero().squeeze(1)
        slots, kv = slots[kept], kv.index_select(2, kept)
    if slots.numel() == 0:
        return
    t = slots.numel()
    if layout.page_map is not None:
        _require_contiguous(layer_tensors, layout)
        patterns = _page_patterns(layout)
        if patterns is not None:
            plan = _PagePlan(slots, layout, patterns)
            for layer, tensor in enumerate(layer_tensors):
                for k in range(2):
                    plan.scatter(tensor, k, kv[k, layer])
            return
        idx = _page_map_index(slots, layout)
        for layer, tensor in enumerate(layer_tensors):
            flat = tensor.view(-1)
            for k in range(2):
                flat.index_copy_(0, idx[k].reshape(-1), kv[k, layer].reshape(-1))
        return
    if all(x.is_contiguous() for x in layer_tensors):
        rows = _flat_rows(slots, layout, ref).reshape(shape[0], -1)
        width = layout.head_size if layout.kind != "mla" else shape[3]
        for layer, tensor in enumerate(layer_tensors):
            flat = tensor.view(-1, width)
            for k in range(shape[0]):
                flat.index_copy_(0, rows[k], kv[k, layer].reshape(-1, width))
        return
    idx = _indices(slots, layout)
    for layer, tensor in enumerate(layer_tensors):
        values = kv[:, layer]
        if layout.kind != "mla":
            values = values.reshape(2, t, layout.num_kv_heads, layout.head_size)
        _paged_view(tensor, layout).index_put_(idx, values)
