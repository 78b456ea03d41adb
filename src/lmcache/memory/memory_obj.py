"""MemoryObj: a piece of memory holding one chunk's KV (or bytes), with ref and pin counts."""

from __future__ import annotations

import threading
from typing import Optional, Protocol, Sequence

import torch

from lmcache.memory.memory_format import MemoryFormat


class _Allocator(Protocol):
    def _free(self, obj: "MemoryObj") -> None: ...


class MemoryObj:
    """One chunk of memory: a typed tensor view over raw bytes, plus ref and pin counts.

    Rules (DESIGN.md §4.8): a new object has ref_count 1 (its producer). Each holder adds one
    with :meth:`ref_count_up` and drops it with :meth:`ref_count_down`; at 0 the bytes return to
    the allocator and the object is dead (``tensor`` raises RuntimeError). Going below 0 raises
    RuntimeError. Pins (lookup guarantees) are counted separately and never go below 0.
    An object is evictable (:attr:`can_evict`) only when ref_count == 1 and it is unpinned.

    Args:
        raw_data: 1-D contiguous uint8 tensor with exactly ``prod(shape) * dtype.itemsize``
            bytes (normally a slice of an allocator's buffer; CPU or CUDA).
        shape: shape of :attr:`tensor`.
        dtype: dtype of :attr:`tensor`.
        fmt: MemoryFormat of the layout.
        allocator: object whose ``_free(obj)`` takes the bytes back when the ref count reaches
            0; None for a standalone object (the bytes are simply garbage-collected).
        offset: byte offset of ``raw_data`` in the allocator's buffer (allocator bookkeeping).
        reserved_bytes: bytes the allocator reserved for it (>= nbytes, alignment included).

    Raises:
        TypeError / ValueError: raw_data is not 1-D uint8 of the right size.
    """

    __slots__ = (
        "_raw", "_tensor", "fmt", "nbytes", "offset", "reserved_bytes",
        "_allocator", "_ref_count", "_pin_count", "_lock", "_freed",
    )

    def __init__(
        self,
        raw_data: torch.Tensor,
        shape: Sequence[int],
        dtype: torch.dtype,
        fmt: MemoryFormat = MemoryFormat.KV_2LTD,
        allocator: Optional[_Allocator] = None,
        offset: int = 0,
        reserved_bytes: Optional[int] = None,
    ) -> None:
        if not isinstance(raw_data, torch.Tensor) or raw_data.dtype != torch.uint8:
            raise TypeError(f"raw_data must be a uint8 tensor, got {raw_data!r:.80}")
        if raw_data.dim() != 1 or not raw_data.is_contiguous():
            raise ValueError(f"raw_data must be 1-D contiguous, got shape {tuple(raw_data.shape)}")
        shape = torch.Size(shape)
        nbytes = shape.numel() * dtype.itemsize
        if raw_data.numel() != nbytes:
            raise ValueError(
                f"raw_data has {raw_data.numel()} bytes; shape {tuple(shape)} of {dtype} "
                f"needs {nbytes}"
            )
        self._raw = raw_data
        with torch.inference_mode(False):  # a normal tensor, writable from any thread
            self._tensor = raw_data.view(dtype).view(shape)
        self.fmt = MemoryFormat(fmt)
        self.nbytes = nbytes
        self.offset = offset
        self.reserved_bytes = nbytes if reserved_bytes is None else reserved_bytes
        self._allocator = allocator
        self._ref_count = 1
        self._pin_count = 0
        self._lock = threading.Lock()
        self._freed = False

    # ---- data -------------------------------------------------------------------------
    @property
    def tensor(self) -> torch.Tensor:
        """The typed view (shape/dtype as allocated). RuntimeError once the object is freed."""
        if self._freed:
            raise RuntimeError(f"{self!r} was freed (ref count reached 0)")
        return self._tensor

    @property
    def shape(self) -> torch.Size:
        """Shape of :attr:`tensor`."""
        return self._tensor.shape

    @property
    def dtype(self) -> torch.dtype:
        """dtype of :attr:`tensor`."""
        return self._tensor.dtype

    @property
    def raw_data(self) -> torch.Tensor:
        """The object's bytes as a 1-D uint8 tensor (a view; writes go to :attr:`tensor`)."""
        if self._freed:
            raise RuntimeError(f"{self!r} was freed (ref count reached 0)")
        return self._raw

    @property
    def byte_array(self) -> memoryview:
        """A writable memoryview (format 'B') over the object's ``nbytes`` bytes (CPU only)."""
        return memoryview(self.raw_data.numpy())

    @property
    def is_valid(self) -> bool:
        """False once the ref count has reached 0 and the memory went back to the allocator."""
        return not self._freed

    # ---- reference counting --------------------------------------------------------------
    def ref_count_up(self) -> None:
        """Add one holder. RuntimeError if the object was already freed."""
        with self._lock:
            if self._freed:
                raise RuntimeError(f"ref_count_up on freed {self!r}")
            self._ref_count += 1

    def ref_count_down(self) -> None:
        """Drop one holder; at 0 the memory returns to the allocator.

        Raises:
            RuntimeError: the count is already 0 (a double release).
        """
        with self._lock:
            if self._ref_count <= 0:
                raise RuntimeError(f"ref_count_down below 0 on {self!r}")
            self._ref_count -= 1
            if self._ref_count > 0:
                return
            self._freed = True
            self._pin_count = 0
        if self._allocator is not None:
            self._allocator._free(self)

    def get_ref_count(self) -> int:
        """Current number of holders."""
        return self._ref_count

    # ---- pinning ----------------------------------------------------------------------------
    def pin(self) -> None:
        """Add one pin (a lookup promised this chunk to a retrieve). RuntimeError if freed."""
        with self._lock:
            if self._freed:
                raise RuntimeError(f"pin on freed {self!r}")
            self._pin_count += 1

    def unpin(self) -> bool:
        """Remove one pin; returns False (and changes nothing) when there was none."""
        with self._lock:
            if self._pin_count == 0:
                return False
            self._pin_count -= 1
            return True

    def get_pin_count(self) -> int:
        """Current number of pins."""
        return self._pin_count

    @property
    def is_pinned(self) -> bool:
        """True while at least one pin is held."""
        return self._pin_count > 0

    @property
    def can_evict(self) -> bool:
        """True when only its tier holds it (ref_count == 1) and it is not pinned."""
        with self._lock:
            return self._ref_count == 1 and self._pin_count == 0 and not self._freed

    def __repr__(self) -> str:
        return (
            f"MemoryObj(shape={tuple(self._tensor.shape)}, dtype={self._tensor.dtype}, "
            f"fmt={self.fmt.name}, offset={self.offset}, ref={self._ref_count}, "
            f"pin={self._pin_count}{', freed' if self._freed else ''})"
        )
