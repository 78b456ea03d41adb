"""CPUMemoryAllocator: one preallocated (pinned when CUDA is present) byte buffer, first fit."""

from __future__ import annotations

import bisect
import logging
import threading
import weakref
from typing import Optional, Sequence

import torch

from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj

logger = logging.getLogger(__name__)

_LIVE: "weakref.WeakSet[CPUMemoryAllocator]" = weakref.WeakSet()


class CPUMemoryAllocator:
    """Hands out MemoryObjs carved from one preallocated uint8 buffer.

    The buffer (``size_bytes`` bytes, CPU) is allocated once, with ``pin_memory=True`` when
    ``torch.cuda.is_available()`` and ``pin_memory`` is not False (pinned memory makes
    GPU<->CPU copies one DMA). Free space is a sorted list of (offset, size) blocks; allocation
    is first fit, freeing coalesces neighbours. Each allocation reserves its byte size rounded
    up to ``alignment``, and starts at a multiple of ``alignment``. Thread-safe (one lock);
    never blocks waiting for memory.

    Args:
        size_bytes: buffer size in bytes, > 0.
        pin_memory: None (pin if CUDA is available), True (same; warns without CUDA), False.
        alignment: power of two >= 16 (so every dtype's view is aligned).

    Raises:
        ValueError: size_bytes <= 0 or bad alignment.
    """

    def __init__(self, size_bytes: int, pin_memory: Optional[bool] = None, alignment: int = 256):
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
            raise ValueError(f"size_bytes must be a positive int, got {size_bytes!r}")
        if (
            isinstance(alignment, bool) or not isinstance(alignment, int)
            or alignment < 16 or alignment & (alignment - 1)
        ):
            raise ValueError(f"alignment must be a power of two >= 16, got {alignment!r}")
        self.alignment = alignment
        pin = pin_memory is not False and torch.cuda.is_available()
        if pin_memory is True and not pin:
            logger.warning("pin_memory=True but CUDA is not available: buffer is not pinned")
        # A normal (not inference-mode) tensor even when built under vLLM's inference_mode:
        # tiers fill MemoryObjs from other threads, outside inference mode.
        self.pinned = pin
        with torch.inference_mode(False):
            self._buffer: Optional[torch.Tensor] = self._new_buffer(size_bytes)
        self._capacity = size_bytes
        self._free_offsets: list[int] = [0]  # sorted starts of free blocks
        self._free_sizes: list[int] = [size_bytes]  # parallel to _free_offsets
        self._used = 0
        self._active = 0
        self._lock = threading.Lock()
        _LIVE.add(self)

    # ---- public API -------------------------------------------------------------------
    @staticmethod
    def live_instances() -> list["CPUMemoryAllocator"]:
        """Every CPUMemoryAllocator not yet garbage-collected (for leak checks)."""
        return list(_LIVE)

    @property
    def buffer(self) -> torch.Tensor:
        """The whole preallocated uint8 CPU buffer (for registering with a transfer channel);
        RuntimeError after close()."""
        if self._buffer is None:
            raise RuntimeError("CPUMemoryAllocator is closed")
        return self._buffer

    @property
    def capacity_bytes(self) -> int:
        """Buffer size in bytes."""
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes reserved by live allocations (alignment padding included)."""
        return self._used

    @property
    def num_active_allocations(self) -> int:
        """Number of MemoryObjs handed out and not yet freed."""
        return self._active

    def reserved_size(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Bytes an allocation of ``shape``/``dtype`` reserves (rounded up to alignment)."""
        return self._round(self._nbytes(shape, dtype))

    def allocate(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        fmt: MemoryFormat = MemoryFormat.KV_2LTD,
    ) -> Optional[MemoryObj]:
        """A new MemoryObj (ref_count 1) of ``shape``/``dtype``, or None when no free block fits.

        The contents are uninitialised. Raises ValueError/TypeError on a bad shape or dtype,
        RuntimeError after :meth:`close`.
        """
        nbytes = self._nbytes(shape, dtype)
        size = self._round(nbytes)
        with self._lock:
            offset = self._take(size)
            if offset is None:
                return None
            buf = self._buffer
        return MemoryObj(
            buf[offset:offset + nbytes], shape, dtype, fmt,
            allocator=self, offset=offset, reserved_bytes=size,
        )

    def batched_allocate(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        n: int,
        fmt: MemoryFormat = MemoryFormat.KV_2LTD,
    ) -> Optional[list[MemoryObj]]:
        """``n`` objects of the same shape, all or nothing (None when they do not all fit).

        One lock and, when a free block holds all ``n``, one cut of the free list (the objects
        are then consecutive in the buffer); each object is freed on its own as usual.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        nbytes = self._nbytes(shape, dtype)
        size = self._round(nbytes)
        offsets: list[int] = []
        with self._lock:
            if n > 1:
                base = self._take(size * n)
                if base is not None:  # one block for all: n objects of it
                    self._active += n - 1
                    offsets = [base + i * size for i in range(n)]
                    n = 0
            for _ in range(n):
                offset = self._take(size)
                if offset is None:
                    for off in offsets:
                        self._give(off, size)
                    return None
                offsets.append(offset)
            buf = self._buffer
        return [
            MemoryObj(buf[o:o + nbytes], shape, dtype, fmt, allocator=self, offset=o,
                      reserved_bytes=size)
            for o in offsets
        ]

    def memcheck(self) -> bool:
        """True when the free list is sorted, non-overlapping, coalesced, inside the buffer,
        and free + used bytes == capacity."""
        with self._lock:
            end_prev = -1
            total = 0
            for off, size in zip(self._free_offsets, self._free_sizes):
                if size <= 0 or off <= end_prev or off + size > self._capacity:
                    return False
                end_prev = off + size
                total += size
            return total + self._used == self._capacity and self._active >= 0

    def close(self) -> None:
        """Release the buffer; later allocations raise RuntimeError. Live objects keep their
        own views alive; freeing them afterwards is harmless."""
        with self._lock:
            if self._active:
                logger.warning("CPUMemoryAllocator closed with %d live allocations", self._active)
            self._buffer = None

    # ---- internals --------------------------------------------------------------------
    def _new_buffer(self, size_bytes: int) -> torch.Tensor:
        """The uint8 buffer of ``size_bytes`` (CPU; pinned when :attr:`pinned`)."""
        return torch.empty(size_bytes, dtype=torch.uint8, pin_memory=self.pinned)

    def _nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        try:
            size = torch.Size(shape)
        except (TypeError, ValueError):
            raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
        if any(d < 0 for d in size):
            raise ValueError(f"shape {tuple(size)} has a negative dimension")
        nbytes = size.numel() * dtype.itemsize
        if nbytes == 0:
            raise ValueError(f"shape {tuple(size)} of {dtype} has 0 bytes; nothing to allocate")
        return nbytes

    def _round(self, nbytes: int) -> int:
        a = self.alignment
        return (nbytes + a - 1) // a * a

    def _take(self, size: int) -> Optional[int]:
        """First fit; caller holds the lock."""
        if self._buffer is None:
            raise RuntimeError("CPUMemoryAllocator is closed")
        for i, block in enumerate(self._free_sizes):
            if block >= size:
                offset = self._free_offsets[i]
                if block == size:
                    del self._free_offsets[i]
                    del self._free_sizes[i]
                else:
                    self._free_offsets[i] = offset + size
                    self._free_sizes[i] = block - size
                self._used += size
                self._active += 1
                return offset
        return None

    def _give(self, offset: int, size: int) -> None:
        """Return a block and coalesce; caller holds the lock."""
        offs, sizes = self._free_offsets, self._free_sizes
        i = bisect.bisect_left(offs, offset)
        merge_prev = i > 0 and offs[i - 1] + sizes[i - 1] == offset
        merge_next = i < len(offs) and offset + size == offs[i]
        if merge_prev and merge_next:
            sizes[i - 1] += size + sizes[i]
            del offs[i]
            del sizes[i]
        elif merge_prev:
            sizes[i - 1] += size
        elif merge_next:
            offs[i] = offset
            sizes[i] += size
        else:
            offs.insert(i, offset)
            sizes.insert(i, size)
        self._used -= size
        self._active -= 1

    def _free(self, obj: MemoryObj) -> None:
        """Called by MemoryObj.ref_count_down at 0."""
        with self._lock:
            self._give(obj.offset, obj.reserved_bytes)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(capacity={self._capacity}, used={self._used}, "
            f"active={self._active}, free_blocks={len(self._free_offsets)}, pinned={self.pinned})"
        )
