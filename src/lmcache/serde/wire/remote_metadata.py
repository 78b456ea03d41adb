"""RemoteMetadata: LMCache's 28-byte header (see :mod:`lmcache.serde.wire` for the layout).

Also the header's dtype codes (:func:`dtype_to_code`; the trailer's wider code table) and
:class:`WireFormatError`, raised by every decoder of :mod:`lmcache.serde.wire`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Union

import torch

from lmcache.memory.memory_format import MemoryFormat

Buffer = Union[bytes, bytearray, memoryview]

HEADER = struct.Struct("<7i")
LMCACHE_METADATA_SIZE = HEADER.size  # 28: what LMCache writes and reads
LEGACY_METADATA_SIZE = LMCACHE_METADATA_SIZE
MAX_DIMS = 4
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30  # 1 GiB: far above one chunk (32 MiB for Llama-8B)
BINARY_FORMATS = (MemoryFormat.BINARY, MemoryFormat.BINARY_BUFFER)

CODE_TO_DTYPE: dict[int, Optional[torch.dtype]] = {
    0: None,
    1: torch.float16,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.float32,
    5: torch.float64,
    6: torch.uint8,
    7: torch.float8_e4m3fn,
    8: torch.float8_e5m2,
}
_DTYPE_TO_CODE: dict[Optional[torch.dtype], int] = {
    None: 0,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float32: 4,
    torch.float64: 5,
    torch.uint8: 6,
    torch.float8_e4m3fn: 7,
    torch.float8_e5m2: 8,
}
# Trailer-only codes: dtypes LMCache's header has no code for (written there as uint8).
_EXTRA_CODES: dict[int, torch.dtype] = {
    9: torch.float8_e4m3fnuz,
    10: torch.float8_e5m2fnuz,
    11: torch.int8,
    12: torch.bool,
}
TRAILER_CODE_TO_DTYPE = {**CODE_TO_DTYPE, **_EXTRA_CODES}
_TRAILER_DTYPE_TO_CODE = {**_DTYPE_TO_CODE, **{d: c for c, d in _EXTRA_CODES.items()}}


class WireFormatError(ValueError):
    """Bytes that do not form a valid, self-consistent metadata/payload pair."""


def dtype_to_code(dtype: Optional[torch.dtype]) -> int:
    """LMCache header code of a dtype (None = raw bytes); one-byte dtypes LMCache has no code
    for (int8, bool, fp8 ``fnuz``) are written as uint8 (6), their exact dtype goes in the
    trailer. ValueError for dtypes the wire cannot carry."""
    if dtype in _DTYPE_TO_CODE:
        return _DTYPE_TO_CODE[dtype]
    if dtype in _TRAILER_DTYPE_TO_CODE:
        return 6
    raise ValueError(
        f"dtype {dtype!r} has no remote wire code; expected one of "
        f"{[str(d) for d in _TRAILER_DTYPE_TO_CODE.values()]}"
    )


def trailer_code(dtype: Optional[torch.dtype]) -> int:
    """The trailer's exact code of a dtype. ValueError for dtypes the wire cannot carry."""
    dtype_to_code(dtype)
    return _TRAILER_DTYPE_TO_CODE[dtype]


@dataclass(frozen=True)
class RemoteMetadata:
    """What the 28-byte header says about a payload.

    Attributes:
        length: payload size in bytes.
        fmt: MemoryFormat of the payload.
        dtype: element dtype, or None for raw bytes (itemsize 1).
        shape: up to four non-negative dims (trailing zeros stripped);
            ``prod(shape) * itemsize == length`` (BINARY formats: ``length`` is the truth).
    """

    length: int
    fmt: MemoryFormat
    dtype: Optional[torch.dtype]
    shape: tuple[int, ...]

    @classmethod
    def for_tensor(cls, tensor: torch.Tensor, fmt: MemoryFormat) -> "RemoteMetadata":
        """Metadata describing ``tensor`` (any device) stored in format ``fmt``.

        Raises:
            ValueError: more than four dims, or a dtype with no wire code.
        """
        if tensor.dim() > MAX_DIMS:
            raise ValueError(f"tensor has {tensor.dim()} dims; the wire header holds {MAX_DIMS}")
        dtype_to_code(tensor.dtype)
        return cls(tensor.numel() * tensor.element_size(), MemoryFormat(fmt), tensor.dtype,
                   tuple(tensor.shape))

    def header_bytes(self) -> bytes:
        """The 28-byte LMCache header (unused shape slots 0)."""
        shape = list(self.shape) + [0] * (MAX_DIMS - len(self.shape))
        return HEADER.pack(self.length, int(self.fmt), dtype_to_code(self.dtype), *shape)
