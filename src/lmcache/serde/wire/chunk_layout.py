"""ChunkLayout: the KV layout a process reads and writes, and :func:`check_layout` of a chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.wire.remote_metadata import RemoteMetadata, WireFormatError

if TYPE_CHECKING:
    from lmcache.metadata import LMCacheMetadata
    from lmcache.serde.wire.metadata import Trailer


@dataclass(frozen=True)
class ChunkLayout:
    """The KV layout a process reads and writes: what a chunk's metadata must match.

    Attributes:
        num_layers, num_kv_heads, head_size: as in LMCacheMetadata.kv_shape (this rank's
            heads; MLA: 1 head of the latent width).
        kv_dtype: dtype of the KV cache.
        use_mla: MLA model (``[1, L, T, D]`` chunks; layerwise ``[T, 1, D]``).
        chunk_size: tokens per full chunk (0 = unknown: token counts are not bounded).
    """

    num_layers: int
    num_kv_heads: int
    head_size: int
    kv_dtype: torch.dtype
    use_mla: bool = False
    chunk_size: int = 0

    @classmethod
    def from_metadata(cls, metadata: "LMCacheMetadata") -> "ChunkLayout":
        """The layout of ``metadata`` (an LMCacheMetadata)."""
        return cls(metadata.num_layers, metadata.num_kv_heads, metadata.head_size,
                   metadata.kv_dtype, bool(metadata.use_mla), metadata.chunk_size)

    @property
    def hidden_dim(self) -> int:
        """num_kv_heads * head_size: the D of MemoryFormat shapes."""
        return self.num_kv_heads * self.head_size

    def full_chunk(self, layerwise: bool = False) -> tuple[tuple[int, ...], MemoryFormat]:
        """(shape, fmt) of a full chunk: ``[2, L, T, D]`` KV_2LTD (MLA ``[1, L, T, D]``
        KV_MLA_FMT), or one layer's ``[T, 2, D]`` (MLA ``[T, 1, D]``) KV_T2D.

        Raises:
            ValueError: chunk_size unknown (0).
        """
        if self.chunk_size < 1:
            raise ValueError("the layout's chunk_size is unknown (0)")
        kv = 1 if self.use_mla else 2
        if layerwise:
            return (self.chunk_size, kv, self.hidden_dim), MemoryFormat.KV_T2D
        fmt = MemoryFormat.KV_MLA_FMT if self.use_mla else MemoryFormat.KV_2LTD
        return (kv, self.num_layers, self.chunk_size, self.hidden_dim), fmt


def check_layout(meta: RemoteMetadata, trailer: Optional[Trailer], expect: ChunkLayout) -> None:
    """Check that a chunk holds KV of layout ``expect``.

    The trailer's layout (when recorded) must equal ``expect`` field by field; a KV format's
    header must agree too: dtype, layers, D = heads × head size, K and V (or MLA), and at most
    ``expect.chunk_size`` tokens. Formats that are not KV (BINARY, compressed serdes) are
    checked through the trailer only.

    Raises:
        WireFormatError: naming the first field that differs.
    """
    got = trailer.layout if trailer is not None else None
    if got is not None:
        for name in ("num_layers", "num_kv_heads", "head_size", "kv_dtype", "use_mla"):
            if getattr(got, name) != getattr(expect, name):
                raise WireFormatError(f"chunk of another KV layout: {name} is "
                                      f"{getattr(got, name)}, this instance has "
                                      f"{getattr(expect, name)}")
    fmt, shape = meta.fmt, meta.shape
    kv = 1 if expect.use_mla else 2
    if fmt in (MemoryFormat.KV_2LTD, MemoryFormat.KV_MLA_FMT):
        want_fmt = MemoryFormat.KV_MLA_FMT if expect.use_mla else MemoryFormat.KV_2LTD
        ok = fmt == want_fmt and len(shape) == 4 and shape[0] == kv and \
            shape[1] == expect.num_layers and shape[3] == expect.hidden_dim
        tokens = shape[2] if len(shape) == 4 else 0
    elif fmt == MemoryFormat.KV_T2D:
        ok = len(shape) == 3 and shape[1] == kv and shape[2] == expect.hidden_dim
        tokens = shape[0] if shape else 0
    elif fmt == MemoryFormat.KV_2TD:
        ok = len(shape) == 3 and shape[0] == 2 and shape[2] == expect.hidden_dim
        tokens = shape[1] if len(shape) == 3 else 0
    else:
        return
    if not ok:
        raise WireFormatError(f"chunk of another KV layout: {fmt.name} shape {shape} does not "
                              f"fit layers={expect.num_layers} D={expect.hidden_dim} "
                              f"mla={expect.use_mla}")
    if meta.dtype != expect.kv_dtype:
        raise WireFormatError(f"chunk of another KV layout: dtype {meta.dtype}, this instance "
                              f"has {expect.kv_dtype}")
    if not 1 <= tokens or (expect.chunk_size and tokens > expect.chunk_size):
        raise WireFormatError(f"chunk holds {tokens} tokens; expected 1..{expect.chunk_size}")
