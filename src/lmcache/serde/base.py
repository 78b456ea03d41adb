"""Serde: the serializer/deserializer between MemoryObjs and remote payload bytes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Protocol, Sequence, Union

import torch

from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.serde.wire.remote_metadata import RemoteMetadata

Buffer = Union[bytes, bytearray, memoryview]


class Allocating(Protocol):
    """What a Serde needs from its ``allocator_backend`` (normally the LocalCPUBackend)."""

    def allocate(
        self, shape: Sequence[int], dtype: torch.dtype, fmt: MemoryFormat
    ) -> Optional[MemoryObj]: ...


class Serde(ABC):
    """Converts one chunk between a CPU MemoryObj and (RemoteMetadata, payload bytes).

    The metadata is what goes into the 28-byte wire header (DESIGN.md §4.5); the trailer
    (KV layout, checksum over key, header and payload) is added and checked by
    :mod:`lmcache.serde.wire`, not by the Serde: ``deserialize`` only sees bytes that
    passed those checks.
    """

    name: str = "serde"

    @abstractmethod
    def serialize(self, obj: MemoryObj) -> tuple[RemoteMetadata, Buffer]:
        """Return the metadata and payload of ``obj`` (a CPU MemoryObj the caller holds a ref
        on for as long as it uses the payload, which may be a view of the object's memory).

        Raises:
            ValueError: the object cannot be described on the wire (dtype, dims, device).
        """

    @abstractmethod
    def deserialize(
        self, meta: RemoteMetadata, payload: Buffer, allocator_backend: Allocating
    ) -> Optional[MemoryObj]:
        """Build a new MemoryObj (ref count 1, owned by the caller) from verified bytes.

        Returns None when ``allocator_backend`` has no room (a miss, never a wait).

        Raises:
            ValueError: payload inconsistent with ``meta``.
        """
