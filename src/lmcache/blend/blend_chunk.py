"""BlendChunkFormat: one stored CacheBlend segment = its KV of every layer + the position it
was computed at, in one self-describing object.

Why one object: CacheBlend needs the positions a segment's K was rotated at (LMCache keeps
them in ``MemoryObjMetadata.cached_positions``, in memory only: its remote and most disk
tiers drop them). Here the start position travels *inside* the stored bytes, so every tier
(CPU, disk, remote, any serde — they all carry BINARY objects as raw bytes) keeps KV and
position together: they cannot be evicted, overwritten or fetched from different tiers
apart, and LMCache's 28-byte header and lmcache's trailer are not touched (non-blend chunks
are byte-for-byte what they were).

Object: MemoryFormat.BINARY, dtype uint8, ``HEADER_SIZE + L*2*T*H*D*itemsize`` bytes::

    b"LMcBlnd1" | start position i64 | num_tokens i64 | num_layers u32 | 2 u32 |
    num_kv_heads u32 | head_size u32 | KV dtype name (keys.dtype_to_name, 16 bytes, NUL pad) |
    8 zero bytes                                    (64 bytes, little-endian)
    KV: [L, 2, T, H*D] of the KV dtype (layer-major: one contiguous [2, T, H*D] per layer)

Positions convention: the segment's T tokens were computed at the consecutive positions
``start, start + 1, ..., start + T - 1`` (a segment is contiguous in the prompt it was stored
from; with vLLM, prompt token i is computed at position i).

Keys: the SegmentTokenDatabase key plus the tag ``(BLEND_TAG, BLEND_TAG_VALUE)``, so a blend
chunk never shares a key with a prefix-cache chunk (whose first-chunk hash can equal a segment
hash) and an instance that does not know this format never looks it up. An object read under
such a key that is not exactly this format for this instance's layout (another magic, layout,
dtype, token count or size) is a miss (``decode`` returns None), never wrong KV.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Optional

import torch

from lmcache.keys import CacheEngineKey, dtype_to_name
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata

MAGIC = b"LMcBlnd1"
_HEADER = struct.Struct("<8sqqIIII16s8x")
HEADER_SIZE = _HEADER.size  # 64
BLEND_TAG = "lmcache.blend"
BLEND_TAG_VALUE = "pos1"


class BlendChunkFormat:
    """Encodes / decodes stored CacheBlend segments for one instance's KV layout.

    Args:
        metadata: this worker's LMCacheMetadata (layers, heads, head size, KV dtype); MLA is
            refused (its latent K has no separate RoPE part to re-position here).

    Raises:
        TypeError: metadata is not an LMCacheMetadata.  ValueError: an MLA model.
    """

    def __init__(self, metadata: LMCacheMetadata) -> None:
        if not isinstance(metadata, LMCacheMetadata):
            raise TypeError(f"metadata must be LMCacheMetadata, got {type(metadata).__name__}")
        if metadata.use_mla:
            raise ValueError("CacheBlend chunks need separate K and V (use_mla=False); MLA "
                             f"metadata {metadata.kv_shape} is not supported")
        self.metadata = metadata
        self._dtype_name = dtype_to_name(metadata.kv_dtype).encode()

    def key(self, segment_key: CacheEngineKey) -> CacheEngineKey:
        """The storage key of a segment: ``segment_key`` with the blend tag appended."""
        return dataclasses.replace(segment_key, request_configs=tuple(
            segment_key.request_configs) + ((BLEND_TAG, BLEND_TAG_VALUE),))

    def kv_shape(self, num_tokens: int) -> torch.Size:
        """``[L, 2, T, H*D]``: the KV part of a segment of ``num_tokens`` tokens."""
        md = self.metadata
        return torch.Size((md.num_layers, 2, num_tokens, md.hidden_dim))

    def nbytes(self, num_tokens: int) -> int:
        """Bytes of a stored segment of ``num_tokens`` tokens (header included)."""
        return HEADER_SIZE + self.kv_shape(num_tokens).numel() * self.metadata.kv_dtype.itemsize

    def allocate(self, allocator_backend, num_tokens: int,
                 start_position: int) -> Optional[tuple[MemoryObj, torch.Tensor]]:
        """A new object (ref 1) for a segment, header written; None when there is no memory.

        Args:
            allocator_backend: anything with ``allocate(shape, dtype, fmt)`` (StorageManager,
                LocalCPUBackend).
            num_tokens: T >= 1.
            start_position: the position of the segment's first token (>= 0).

        Returns:
            ``(obj, kv)``: ``kv`` is the writable ``[L, 2, T, H*D]`` KV view of ``obj``
            (the caller fills it).

        Raises:
            ValueError: num_tokens < 1 or start_position < 0.
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
        if isinstance(start_position, bool) or not isinstance(start_position, int) \
                or start_position < 0:
            raise ValueError(f"start_position must be an int >= 0, got {start_position!r}")
        obj = allocator_backend.allocate(torch.Size((self.nbytes(num_tokens),)), torch.uint8,
                                         MemoryFormat.BINARY)
        if obj is None:
            return None
        md = self.metadata
        header = _HEADER.pack(MAGIC, start_position, num_tokens, md.num_layers, 2,
                              md.num_kv_heads, md.head_size, self._dtype_name)
        obj.tensor[:HEADER_SIZE].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        return obj, self._kv_view(obj, num_tokens)

    def decode(self, obj: Optional[MemoryObj],
               num_tokens: int) -> Optional[tuple[int, torch.Tensor]]:
        """``(start_position, kv [L, 2, T, H*D] view)`` of a stored segment of ``num_tokens``
        tokens, or None when ``obj`` is not exactly such a segment of this layout (a miss)."""
        if obj is None or obj.fmt != MemoryFormat.BINARY or obj.dtype != torch.uint8 \
                or obj.tensor.dim() != 1 or obj.tensor.numel() != self.nbytes(num_tokens):
            return None
        raw = obj.tensor[:HEADER_SIZE]
        head = bytes(raw.cpu().numpy()) if raw.is_cuda else bytes(raw.numpy())
        magic, start, tokens, layers, kv, heads, head_size, dname = _HEADER.unpack(head)
        md = self.metadata
        if (magic, tokens, layers, kv, heads, head_size) != (
                MAGIC, num_tokens, md.num_layers, 2, md.num_kv_heads, md.head_size) \
                or dname.rstrip(b"\0") != self._dtype_name or start < 0:
            return None
        return start, self._kv_view(obj, num_tokens)

    def _kv_view(self, obj: MemoryObj, num_tokens: int) -> torch.Tensor:
        return obj.tensor[HEADER_SIZE:].view(self.metadata.kv_dtype).view(
            self.kv_shape(num_tokens))
