"""KVCacheLayout: how one layer's paged KV tensor is laid out by the serving engine.

The layout is an injected description (the vLLM integration builds it from the engine's
attention backend); the GPU connector never guesses it from a tensor's shape. Facts from
DESIGN.md §4.6 (vLLM paged KV layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("cpu_packed", "flash_packed", "legacy_5d", "mla")


@dataclass(frozen=True)
class KVCacheLayout:
    """Layout of ONE layer's paged KV tensor as vLLM hands it over.

    ``kind`` (N = block_size, H = num_kv_heads, D = head_size; a slot s is token ``s % N``
    of block ``s // N``):

    - ``"cpu_packed"``: ``[num_blocks, H, N, 2*D]`` (vLLM 0.32 CPU attention backend). Each
      (block, head) page ``[N, 2D]`` is read as ``[2N, D]``: rows ``0..N-1`` are K of the
      block's N tokens, rows ``N..2N-1`` are V. K of slot s, head h is
      ``page(b, h).view(2N, D)[o]``, V is ``...[N + o]``.
      ``page_map`` overrides that order when the CPU kernel packs a page differently (vLLM's
      ``vec`` ISA stores K of a block dim-major, ``[D, N]``): ``page_map[kv, o, d]`` is the
      flat position, within the page's ``2·N·D`` elements, of element d of token o's K (kv=0)
      or V (kv=1). The vLLM integration measures it with vLLM's own cache-write kernel.
    - ``"flash_packed"``: same shape; per (block, head, token) the last dim C holds
      ``K = C[:D]`` and ``V = C[D:]`` (FlashAttention / Triton backends).
    - ``"legacy_5d"``: ``[2, num_blocks, N, H, D]`` (older vLLM; index 0 = K, 1 = V).
    - ``"mla"``: ``[num_blocks, N, D]`` with one latent vector per token; H must be 1 and
      D is the latent width (kv_lora_rank + rope_dim).

    Raises:
        ValueError: unknown kind, a non-positive size, ``num_kv_heads != 1`` for mla, or a
            ``page_map`` that is not an int64 ``[2, N, D]`` permutation of the page (cpu_packed only).
    """

    kind: str
    block_size: int
    num_kv_heads: int
    head_size: int
    page_map: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"KVCacheLayout kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("block_size", "num_kv_heads", "head_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVCacheLayout {name} must be an int >= 1, got {value!r}")
        if self.kind == "mla" and self.num_kv_heads != 1:
            raise ValueError(
                f"KVCacheLayout kind 'mla' needs num_kv_heads == 1, got {self.num_kv_heads}"
            )
        if self.page_map is not None:
            self._check_page_map(self.page_map)

    def _check_page_map(self, pm: object) -> None:
        n, d = self.block_size, self.head_size
        if self.kind != "cpu_packed":
            raise ValueError(f"KVCacheLayout page_map is only valid for cpu_packed, not {self.kind!r}")
        if not isinstance(pm, torch.Tensor) or pm.dtype != torch.int64 or tuple(pm.shape) != (2, n, d):
            got = f"{pm.dtype} {tuple(pm.shape)}" if isinstance(pm, torch.Tensor) else type(pm).__name__
            raise ValueError(f"KVCacheLayout page_map must be an int64 tensor [2, {n}, {d}], got {got}")
        if not torch.equal(pm.flatten().sort().values, torch.arange(2 * n * d)):
            raise ValueError(f"KVCacheLayout page_map is not a permutation of the {2 * n * d} page elements")

    @property
    def is_mla(self) -> bool:
        """True for the MLA layout (one latent vector per token, MemoryFormat KV_MLA_FMT)."""
        return self.kind == "mla"

    @property
    def hidden_dim(self) -> int:
        """num_kv_heads * head_size: the last dim of the MemoryObj tensor."""
        return self.num_kv_heads * self.head_size

    def expected_shape(self) -> str:
        """Human-readable expected shape of one layer tensor (used in error messages)."""
        n, h, d = self.block_size, self.num_kv_heads, self.head_size
        if self.kind in ("cpu_packed", "flash_packed"):
            return f"[num_blocks, {h}, {n}, {2 * d}]"
        if self.kind == "legacy_5d":
            return f"[2, num_blocks, {n}, {h}, {d}]"
        return f"[num_blocks, {n}, {d}]"

    def num_blocks(self, tensor: torch.Tensor) -> int:
        """Number of blocks of a layer tensor of this layout (no validation)."""
        return int(tensor.shape[1] if self.kind == "legacy_5d" else tensor.shape[0])

    def num_slots(self, tensor: torch.Tensor) -> int:
        """num_blocks * block_size: valid slots are ``0 <= s < num_slots``."""
        return self.num_blocks(tensor) * self.block_size

    def check_tensor(self, tensor: object, dtype: torch.dtype | None = None) -> None:
        """Check that ``tensor`` is one layer tensor of this layout.

        Args:
            tensor: the layer's KV tensor (CPU or CUDA).
            dtype: the expected dtype (``LMCacheMetadata.kv_dtype``), or None to skip.

        Raises:
            TypeError: ``tensor`` is not a torch.Tensor.
            ValueError: wrong dtype, shape, or memory strides that the packed views need;
                the message names the tensor's shape/dtype/strides and the expected ones.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"KV cache layer must be a torch.Tensor, got {type(tensor).__name__}")
        if dtype is not None and tensor.dtype != dtype:
            raise ValueError(
                f"KV cache layer has dtype {tensor.dtype}, expected {dtype} "
                f"(shape {tuple(tensor.shape)}, layout {self.kind})"
            )
        shape = tuple(tensor.shape)
        n, h, d = self.block_size, self.num_kv_heads, self.head_size
        if self.kind in ("cpu_packed", "flash_packed"):
            ok = len(shape) == 4 and shape[1:] == (h, n, 2 * d)
        elif self.kind == "legacy_5d":
            ok = len(shape) == 5 and shape[0] == 2 and shape[2:] == (n, h, d)
        else:
            ok = len(shape) == 3 and shape[1:] == (n, d)
        if not ok:
            raise ValueError(
                f"KV cache layer has shape {shape} (dtype {tensor.dtype}), expected "
                f"{self.expected_shape()} for layout {self.kind}"
            )
        if tensor.stride(-1) != 1 or (self.kind == "cpu_packed" and tensor.stride(-2) != 2 * d):
            raise ValueError(
                f"KV cache layer with shape {shape} has strides {tuple(tensor.stride())}; "
                f"layout {self.kind} needs the last dim contiguous"
                + (" and each [N, 2D] page contiguous" if self.kind == "cpu_packed" else "")
            )


def check_layer_tensors(kvcaches, layout: KVCacheLayout, kv_shape: tuple, dtype: torch.dtype) -> None:
    """Check a list of per-layer paged tensors against ``layout``: ``num_layers`` of them, each of
    the layout's shape and ``dtype``, all with the same number of blocks. ``kv_shape`` is
    LMCacheMetadata's (its first entry is the number of layers).

    Raises:
        ValueError: naming the offending layer, its shape/dtype and what was expected.
    """
    if len(kvcaches) != kv_shape[0]:
        raise ValueError(f"kvcaches has {len(kvcaches)} layers, metadata kv_shape {tuple(kv_shape)} "
                         f"has {kv_shape[0]}")
    blocks = layout.num_blocks(kvcaches[0])
    for i, tensor in enumerate(kvcaches):
        try:
            layout.check_tensor(tensor, dtype)
        except ValueError as err:
            raise ValueError(f"kvcaches[{i}]: {err}") from None
        if layout.num_blocks(tensor) != blocks:
            raise ValueError(f"kvcaches[{i}] has shape {tuple(tensor.shape)}: "
                             f"{layout.num_blocks(tensor)} blocks, kvcaches[0] has {blocks}")
