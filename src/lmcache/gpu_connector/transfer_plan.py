"""TransferPlan: the launch parameters of the paged-KV kernels (csrc/paged_kv_transfer.cuh).

Pure Python and torch (no CuPy): it turns the layer tensors, the layout and the MemoryObj
tensors into the byte strides, per-chunk descriptors and word width the kernel takes, and checks
them. Kept apart from the launcher so the address arithmetic can be checked on a CPU (tests
replay a plan in Python against the torch reference).

Addressing (DESIGN.md §4.6 layouts; e = dtype bytes, N = block_size, H = heads, D = head size):
byte c of head h, kv k (0 = K, 1 = V) of slot s in layer l is at
``layer_address[l] + (s // N) * block + (s % N) * tok + h * head + k * kv + c``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout

DESC_WORDS = 6  # obj address, slot index of token 0, tokens, layer stride, kv stride, token stride
_MAX_ROWS = 1 << 30  # the kernel indexes rows (layer, kv, token) of one descriptor with int32


@dataclass(frozen=True)
class PagedStrides:
    """Byte strides of one layer tensor of a layout (see module docstring)."""

    block: int
    tok: int
    head: int
    kv: int
    num_kv: int  # 2 (K and V), 1 for MLA
    head_bytes: int  # D * e
    num_slots: int  # num_blocks * block_size


def paged_strides(tensor: torch.Tensor, layout: KVCacheLayout) -> PagedStrides:
    """Byte strides of ``tensor`` (one layer of ``layout``; shape checked by the caller)."""
    e = tensor.element_size()
    st = [s * e for s in tensor.stride()]
    d = layout.head_size * e
    n = layout.block_size
    num_slots = layout.num_slots(tensor)
    if layout.kind == "flash_packed":  # [B, H, N, 2D], C = [K | V]
        return PagedStrides(st[0], st[2], st[1], d, 2, d, num_slots)
    if layout.kind == "cpu_packed":  # [B, H, N, 2D], page read as [2N, D]
        return PagedStrides(st[0], d, st[1], n * d, 2, d, num_slots)
    if layout.kind == "legacy_5d":  # [2, B, N, H, D]
        return PagedStrides(st[1], st[2], st[3], st[0], 2, d, num_slots)
    return PagedStrides(st[0], st[1], 0, 0, 1, d, num_slots)  # mla [B, N, D]


@functools.lru_cache(maxsize=64)
def _mapped_delta(storage_address: int) -> int:
    import cupy  # noqa: PLC0415

    attrs = cupy.cuda.runtime.pointerGetAttributes(storage_address)
    if not attrs.devicePointer:
        raise ValueError(f"pinned host memory at {storage_address:#x} has no device mapping")
    return attrs.devicePointer - storage_address


def device_address(tensor: torch.Tensor, device: torch.device) -> int:
    """The address a kernel on ``device`` uses for ``tensor``'s first element.

    CUDA tensors on ``device``: their data pointer. Pinned host tensors: the UVA-mapped device
    pointer of their memory (equal to the host pointer on UVA systems; asked of the driver once
    per allocation).

    Raises:
        ValueError: a CUDA tensor on another device, or pageable host memory (not mapped).
    """
    if tensor.is_cuda:
        if tensor.device != device:
            raise ValueError(f"MemoryObj tensor is on {tensor.device}, the KV cache on {device}")
        return tensor.data_ptr()
    if not tensor.is_pinned():
        raise ValueError(
            "MemoryObj tensor is in pageable host memory; the kernels need pinned (mapped) host "
            "memory or device memory (CPUMemoryAllocator pins when CUDA is available)"
        )
    base = tensor.untyped_storage().data_ptr()
    return tensor.data_ptr() + _mapped_delta(base)


class _AddressCache:
    """:func:`device_address` for many views of few allocations: one pinned check per storage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.deltas: dict[int, int] = {}

    def __call__(self, tensor: torch.Tensor) -> int:
        if tensor.is_cuda:
            return device_address(tensor, self.device)
        base = tensor.untyped_storage().data_ptr()
        delta = self.deltas.get(base)
        if delta is None:
            delta = self.deltas[base] = device_address(tensor, self.device) - tensor.data_ptr()
        return tensor.data_ptr() + delta


@dataclass(frozen=True)
class TransferPlan:
    """Everything one kernel launch needs besides the slot mapping."""

    strides: PagedStrides
    layer_addresses: tuple[int, ...]
    descriptors: list  # [num_chunks][DESC_WORDS] ints, see csrc/paged_kv_transfer.cuh
    num_layers: int  # layers per object: L (multi-layer) or 1 (single layer)
    word_bytes: int  # 16, 8, 4, 2 or 1: bytes per load/store
    max_rows: int  # most (layer, kv, token) rows of one descriptor
    heads: int  # num_kv_heads (1 for MLA)
    block_size: int  # tokens per block (N)

    desc_bytes = DESC_WORDS * 8

    @property
    def num_chunks(self) -> int:
        return len(self.descriptors)

    @property
    def words_per_head(self) -> int:
        return self.strides.head_bytes // self.word_bytes

    @property
    def words_per_row(self) -> int:
        return self.heads * self.words_per_head


def _word_bytes(values: Sequence[int]) -> int:
    for width in (16, 8, 4, 2):
        if all(v % width == 0 for v in values):
            return width
    return 1


def plan_transfer(
    layer_tensors: Sequence[torch.Tensor],
    layout: KVCacheLayout,
    objs: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    slot_starts: Sequence[int],
    *,
    single_layer: bool,
    address_of: Optional[Callable[[torch.Tensor], int]] = None,
) -> TransferPlan:
    """Check the arguments of a transfer and compute its launch parameters.

    Args: as ``cupy_kernels.launch_transfer``; ``address_of`` maps an object tensor to the
        address the kernel uses (default :func:`device_address` on the layers' device).

    Raises:
        ValueError: no layer tensors, an object of the wrong shape/dtype/strides, unequal
            ``objs``/``slot_starts``, or a chunk's slots outside ``slot_mapping``.
    """
    if not layer_tensors:
        raise ValueError("need at least one layer tensor")
    if single_layer and len(layer_tensors) != 1:
        raise ValueError(f"a single-layer transfer takes 1 layer tensor, got {len(layer_tensors)}")
    if len(objs) != len(slot_starts):
        raise ValueError(f"got {len(objs)} objects but {len(slot_starts)} slot starts")
    ref = layer_tensors[0]
    device = ref.device
    if address_of is None:
        address_of = _AddressCache(device)
    strides = paged_strides(ref, layout)
    num_layers = len(layer_tensors)
    hidden = layout.hidden_dim
    e = ref.element_size()
    descriptors: list[list[int]] = []
    align = [strides.head_bytes, strides.block, strides.tok, strides.head, strides.kv]
    align += [t.data_ptr() for t in layer_tensors]
    max_tokens = max(1, _MAX_ROWS // (num_layers * strides.num_kv))
    num_slots_in_mapping = slot_mapping.numel()
    dtype, want_dims = ref.dtype, (3 if single_layer else 4)
    want = (strides.num_kv, hidden) if single_layer else (strides.num_kv, num_layers, hidden)
    for c, (obj, start) in enumerate(zip(objs, slot_starts)):
        shape, st = obj.shape, obj.stride()
        if obj.dtype != dtype or len(shape) != want_dims or st[-1] != 1:
            raise ValueError(
                f"object {c} has shape {tuple(shape)} dtype {obj.dtype} strides {tuple(st)}; "
                f"expected a {want_dims}-D {dtype} tensor with a contiguous last dim"
            )
        if single_layer:  # [T, kv, HD]
            ntok, got = shape[0], (shape[1], shape[2])
            st_l, st_k, st_t = 0, st[1] * e, st[0] * e
        else:  # [kv, L, T, HD]
            ntok, got = shape[2], (shape[0], shape[1], shape[3])
            st_l, st_k, st_t = st[1] * e, st[0] * e, st[2] * e
        if got != want:
            raise ValueError(
                f"object {c} has shape {tuple(shape)}, expected "
                + (f"[T, {strides.num_kv}, {hidden}]" if single_layer
                   else f"[{strides.num_kv}, {num_layers}, T, {hidden}]")
            )
        if not isinstance(start, int) or start < 0 or start + ntok > num_slots_in_mapping:
            raise ValueError(
                f"object {c} needs slot_mapping[{start}:{start}+{ntok}] but slot_mapping has "
                f"{num_slots_in_mapping} entries"
            )
        if ntok == 0:
            continue
        address = address_of(obj)
        align += (address, st_l, st_k, st_t)
        if ntok <= max_tokens:
            descriptors.append([address, start, ntok, st_l, st_k, st_t])
            continue
        for t0 in range(0, ntok, max_tokens):  # split so rows fit the kernel's int32 index
            n = min(max_tokens, ntok - t0)
            descriptors.append([address + t0 * st_t, start + t0, n, st_l, st_k, st_t])
    rows = max((d[2] for d in descriptors), default=0) * num_layers * strides.num_kv
    return TransferPlan(
        strides=strides,
        layer_addresses=tuple(t.data_ptr() for t in layer_tensors),
        descriptors=descriptors,
        num_layers=num_layers,
        word_bytes=_word_bytes(align),
        max_rows=rows,
        heads=layout.num_kv_heads,
        block_size=layout.block_size,
    )
