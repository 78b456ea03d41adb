"""NaiveSerde: the payload is the chunk's raw bytes (LMCache's ``remote_serde: naive``)."""

from __future__ import annotations

from typing import Optional

import torch

from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.serde.base import Allocating, Buffer, Serde
from lmcache.serde.wire.remote_metadata import RemoteMetadata


class NaiveSerde(Serde):
    """No compression: payload = the MemoryObj's bytes, metadata = its fmt, dtype and shape.

    Serializing is zero-copy (the payload is a memoryview of the object's CPU memory);
    deserializing copies once, into memory from ``allocator_backend.allocate``.
    """

    name = "naive"

    def serialize(self, obj: MemoryObj) -> tuple[RemoteMetadata, Buffer]:
        """(metadata, memoryview of ``obj``'s bytes). ValueError for non-CPU objects."""
        tensor = obj.tensor
        if tensor.device.type != "cpu":
            raise ValueError(f"NaiveSerde needs a CPU MemoryObj, got device {tensor.device}")
        return RemoteMetadata.for_tensor(tensor, obj.fmt), obj.byte_array

    def deserialize(
        self, meta: RemoteMetadata, payload: Buffer, allocator_backend: Allocating
    ) -> Optional[MemoryObj]:
        """Allocate ``meta.shape`` of ``meta.dtype`` (uint8 for raw bytes) and copy the payload.

        A BINARY payload that is a compressed stream (cachegen, kivi, fp8; see
        :mod:`lmcache.serde.compressed`) is decoded by the codec its header names.

        Raises:
            ValueError: ``len(payload) != meta.length``; a foreign, newer or corrupt stream.
        """
        view = memoryview(payload).cast("B")
        if meta.fmt == MemoryFormat.BINARY:  # a compressing serde's stream: its own header
            from lmcache.serde.compressed import decode_stream, is_stream  # decides (or a miss)

            if is_stream(view):
                return decode_stream(view, allocator_backend)
        if view.nbytes != meta.length:
            raise ValueError(f"payload is {view.nbytes} bytes, metadata says {meta.length}")
        dtype = meta.dtype if meta.dtype is not None else torch.uint8
        obj = allocator_backend.allocate(torch.Size(meta.shape), dtype, meta.fmt)
        if obj is None:
            return None
        obj.byte_array[:] = view
        return obj
