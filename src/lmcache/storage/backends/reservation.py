"""Reservation: memory taken at lookup time for one read whose exact shape is not known yet.

A tier whose chunk sizes are known only once the bytes arrive (the remote tier) reserves, when a
lookup starts its prefetch, one block of the largest chunk size it can hold (a full chunk of the
worker's KV layout) from the allocator_backend. The read then deserializes into that block: the
Reservation is the ``Allocating`` handed to the Serde, and its :meth:`Reservation.allocate`
returns a MemoryObj of the requested shape/dtype over the block's first bytes. That object owns
the block: when its last reference is dropped, the block goes back to the allocator. A read that
ends without an object (miss, corrupt bytes, error, cancelled) calls :meth:`Reservation.release`.
So a prefetch never finds the memory gone when its bytes arrive, and nothing stays allocated
however the read ends.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Optional

import torch

from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.serde.base import Allocating


class _Handover:
    """The allocator of an object carved from a reserved block: freeing it frees the block."""

    __slots__ = ("block",)

    def __init__(self, block: MemoryObj) -> None:
        self.block = block

    def _free(self, obj: MemoryObj) -> None:
        self.block.ref_count_down()


class Reservation:
    """One reserved block (``block``: a uint8 MemoryObj, ref 1, owned by the Reservation until
    :meth:`allocate` hands it over or :meth:`release` frees it). Thread-safe; single use.

    Args:
        block: the reserved memory (from :meth:`reserve`).
        fallback: where :meth:`allocate` takes memory when the request does not fit the block
            (the block is freed first).
    """

    def __init__(self, block: MemoryObj, fallback: Allocating) -> None:
        self._block: Optional[MemoryObj] = block
        self.nbytes = block.nbytes
        self.fallback = fallback
        self._lock = threading.Lock()

    @classmethod
    def reserve(cls, allocator_backend: Allocating, nbytes: int) -> Optional["Reservation"]:
        """A Reservation of ``nbytes`` bytes (> 0) from ``allocator_backend``, or None when it
        has no room (after evicting what it may evict)."""
        block = allocator_backend.allocate((nbytes,), torch.uint8, MemoryFormat.BINARY)
        return None if block is None else cls(block, allocator_backend)

    def _take(self) -> Optional[MemoryObj]:
        with self._lock:
            block, self._block = self._block, None
        return block

    @property
    def held(self) -> bool:
        """True while the block is neither handed over nor released."""
        return self._block is not None

    def allocate(self, shape: Sequence[int], dtype: torch.dtype,
                 fmt: MemoryFormat = MemoryFormat.KV_2LTD) -> Optional[MemoryObj]:
        """A MemoryObj (ref 1, uninitialised) of ``shape``/``dtype`` over the reserved block
        when it fits (the object then owns the block), else the block is freed and the
        ``fallback`` allocates (None when it has no room). After the block was handed over or
        released, always the fallback.

        Raises:
            TypeError / ValueError: bad shape or dtype (the block is kept for release()).
        """
        size = torch.Size(shape)
        nbytes = size.numel() * dtype.itemsize
        if nbytes == 0:
            raise ValueError(f"shape {tuple(size)} of {dtype} has 0 bytes; nothing to allocate")
        block = self._take()
        if block is None:
            return self.fallback.allocate(size, dtype, fmt)
        if nbytes > block.nbytes:
            block.ref_count_down()
            return self.fallback.allocate(size, dtype, fmt)
        return MemoryObj(block.raw_data[:nbytes], size, dtype, fmt, allocator=_Handover(block),
                         offset=block.offset, reserved_bytes=block.reserved_bytes)

    def release(self) -> None:
        """Free the block unless it was handed over (idempotent)."""
        block = self._take()
        if block is not None:
            block.ref_count_down()
