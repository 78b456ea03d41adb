"""The byte layouts lmcache writes outside its own process: remote metadata and chunk files.

Remote metadata (DESIGN.md §4.5, LMCache's ``RemoteMetadata`` layout) is 28 bytes, seven
little-endian int32::

    length, fmt, dtype code, shape[0], shape[1], shape[2], shape[3]

``length`` is the payload size in bytes, ``fmt`` a :class:`MemoryFormat` value, and the dtype
codes are none 0, half 1, float16 2, bfloat16 3, float32 4, float64 5, uint8 6, fp8_e4m3fn 7,
fp8_e5m2 8 (``torch.half`` *is* ``torch.float16``; it is written as 2, and 1 and 2 both read as
float16). A shape with fewer than four dimensions fills the unused trailing slots with -1.

lmcache appends its own checksum, so the metadata it writes is **36 bytes**::

    28-byte header | xxh3_64(header 28 bytes ‖ payload) as little-endian uint64

The checksum covers the header fields too, so a flipped shape or dtype is detected as well as a
flipped payload byte. A 28-byte metadata value (as LMCache writes it) is still accepted; its
payload is then checked by length only.

Where metadata and payload travel together (a LocalDiskBackend file, an ``fs://`` file, an
``lm://`` value) the layout is::

    b"LMCACHE1" (8 bytes) | 36-byte metadata | payload            (FILE_HEADER_SIZE = 44)

Valkey/Redis keep LMCache's two-key layout: ``<key>kv_bytes`` holds the payload (written first)
and ``<key>metadata`` the 36-byte metadata.

Every decoder here checks sizes before trusting them (``max_payload_bytes``) and raises
:class:`WireFormatError` (a ValueError) on anything inconsistent; callers turn that into a miss.
Nothing is ever unpickled.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional, Union

import torch
import xxhash

from lmcache.memory.memory_format import MemoryFormat

Buffer = Union[bytes, bytearray, memoryview]

HEADER = struct.Struct("<7i")
CHECKSUM = struct.Struct("<Q")
LEGACY_METADATA_SIZE = HEADER.size  # 28
METADATA_SIZE = HEADER.size + CHECKSUM.size  # 36
FILE_MAGIC = b"LMCACHE1"
FILE_HEADER_SIZE = len(FILE_MAGIC) + METADATA_SIZE  # 44
MAX_DIMS = 4
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30  # 1 GiB: far above one chunk (32 MiB for Llama-8B)

_CODE_TO_DTYPE: dict[int, Optional[torch.dtype]] = {
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


class WireFormatError(ValueError):
    """Bytes that do not form a valid, self-consistent metadata/payload pair."""


def dtype_to_code(dtype: Optional[torch.dtype]) -> int:
    """Wire code of a dtype (None = raw bytes). ValueError for dtypes with no code."""
    try:
        return _DTYPE_TO_CODE[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype!r} has no remote wire code; expected one of "
            f"{[str(d) for d in _DTYPE_TO_CODE]}"
        ) from None


@dataclass(frozen=True)
class RemoteMetadata:
    """What the 28-byte header says about a payload.

    Attributes:
        length: payload size in bytes.
        fmt: MemoryFormat of the payload.
        dtype: element dtype, or None for raw bytes (itemsize 1).
        shape: up to four non-negative dims; ``prod(shape) * itemsize == length``.
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
        """The 28-byte LMCache header."""
        shape = list(self.shape) + [-1] * (MAX_DIMS - len(self.shape))
        return HEADER.pack(self.length, int(self.fmt), dtype_to_code(self.dtype), *shape)


def checksum(header: Buffer, payload: Buffer) -> int:
    """xxh3_64 of the 28 header bytes followed by the payload (an unsigned 64-bit int)."""
    h = xxhash.xxh3_64()
    h.update(header)
    h.update(payload)
    return h.intdigest()


def start_checksum(meta: RemoteMetadata) -> "xxhash.xxh3_64":
    """Incremental :func:`checksum`: a state already fed the header; ``update()`` it with the
    payload in pieces (while they are hot in cache), then :func:`finish_metadata`."""
    state = xxhash.xxh3_64()
    state.update(meta.header_bytes())
    return state


def finish_metadata(meta: RemoteMetadata, state: "xxhash.xxh3_64") -> bytes:
    """The 36-byte metadata whose checksum is ``state``'s digest (see start_checksum)."""
    return meta.header_bytes() + CHECKSUM.pack(state.intdigest())


def encode_metadata(meta: RemoteMetadata, payload: Buffer) -> bytes:
    """36 bytes: header then checksum of (header, payload).

    Raises:
        ValueError: ``len(payload)`` differs from ``meta.length``.
    """
    size = memoryview(payload).nbytes
    if size != meta.length:
        raise ValueError(f"payload has {size} bytes, metadata says {meta.length}")
    header = meta.header_bytes()
    return header + CHECKSUM.pack(checksum(header, payload))


def decode_metadata(
    data: Buffer, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> tuple[RemoteMetadata, Optional[int]]:
    """Parse 36-byte (or legacy 28-byte) metadata into (metadata, checksum or None).

    Raises:
        WireFormatError: wrong size, unknown fmt or dtype code, bad shape, a length above
            ``max_payload_bytes`` or one that disagrees with shape × itemsize.
    """
    data = bytes(data)
    if len(data) not in (METADATA_SIZE, LEGACY_METADATA_SIZE):
        raise WireFormatError(
            f"metadata is {len(data)} bytes; expected {METADATA_SIZE} or {LEGACY_METADATA_SIZE}"
        )
    length, fmt, code, *dims = HEADER.unpack_from(data)
    if not 0 <= length <= max_payload_bytes:
        raise WireFormatError(f"payload length {length} outside [0, {max_payload_bytes}]")
    try:
        fmt = MemoryFormat(fmt)
    except ValueError:
        raise WireFormatError(f"unknown MemoryFormat value {fmt}") from None
    if code not in _CODE_TO_DTYPE:
        raise WireFormatError(f"unknown dtype code {code}")
    dtype = _CODE_TO_DTYPE[code]
    ndim = dims.index(-1) if -1 in dims else MAX_DIMS
    shape = tuple(dims[:ndim])
    if any(d < 0 for d in shape) or any(d != -1 for d in dims[ndim:]):
        raise WireFormatError(f"bad shape slots {dims}")
    itemsize = 1 if dtype is None else dtype.itemsize
    if math.prod(shape) * itemsize != length:
        raise WireFormatError(f"shape {shape} of {dtype} is not {length} bytes")
    digest = CHECKSUM.unpack_from(data, HEADER.size)[0] if len(data) == METADATA_SIZE else None
    return RemoteMetadata(length, fmt, dtype, shape), digest


def verify_payload(
    metadata: Buffer, payload: Buffer, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> RemoteMetadata:
    """Decode ``metadata`` and check that ``payload`` is exactly what it describes.

    Raises:
        WireFormatError: bad metadata, payload length disagreeing with the header, or a
            checksum mismatch.
    """
    meta, digest = decode_metadata(metadata, max_payload_bytes)
    size = memoryview(payload).nbytes
    if size != meta.length:
        raise WireFormatError(f"payload is {size} bytes but the header says {meta.length}")
    if digest is not None and checksum(bytes(metadata)[: HEADER.size], payload) != digest:
        raise WireFormatError("payload checksum mismatch")
    return meta


def key_to_filename(key: str, suffix: str = "") -> str:
    """A file name for a key string, then ``suffix``: ``%`` → ``%25``, ``/`` → ``%2F``, and a
    leading ``.`` → ``%2E`` (reversible with :func:`filename_to_key`).

    Raises:
        ValueError: empty key, NUL in key, or a name longer than 255 bytes.
    """
    if not key or "\0" in key:
        raise ValueError(f"key {key!r} cannot be a file name (empty or contains NUL)")
    name = key.replace("%", "%25").replace("/", "%2F")
    if name.startswith("."):
        name = "%2E" + name[1:]
    name += suffix
    if len(name.encode("utf-8")) > 255:
        raise ValueError(f"file name for key {key!r} is longer than 255 bytes")
    return name


def filename_to_key(name: str, suffix: str = "") -> str:
    """Inverse of :func:`key_to_filename`. ValueError when ``name`` is not such a name."""
    if suffix:
        if not name.endswith(suffix):
            raise ValueError(f"file name {name!r} does not end with {suffix!r}")
        name = name[: -len(suffix)]
    if "/" in name or not name:
        raise ValueError(f"{name!r} is not an encoded key")
    out, i = [], 0
    table = {"%25": "%", "%2F": "/", "%2E": "."}
    while i < len(name):
        if name[i] == "%":
            code = name[i : i + 3]
            if code not in table or (code == "%2E" and i != 0):
                raise ValueError(f"bad escape {code!r} in file name {name!r}")
            out.append(table[code])
            i += 3
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def encode_file_header(meta: RemoteMetadata, payload: Buffer) -> bytes:
    """The 44-byte prefix of a chunk file or single-value blob: magic then metadata."""
    return FILE_MAGIC + encode_metadata(meta, payload)


def split_file_header(data: Buffer) -> bytes:
    """Return the 36 metadata bytes of a 44-byte file header.

    Raises:
        WireFormatError: too short or wrong magic.
    """
    view = memoryview(data)
    if view.nbytes < FILE_HEADER_SIZE or bytes(view[: len(FILE_MAGIC)]) != FILE_MAGIC:
        raise WireFormatError("not an lmcache chunk file (short or bad magic)")
    return bytes(view[len(FILE_MAGIC) : FILE_HEADER_SIZE])


def decode_blob(
    blob: Buffer, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> tuple[RemoteMetadata, memoryview]:
    """Parse and verify a whole ``magic | metadata | payload`` value; payload is a view.

    Raises:
        WireFormatError: see :func:`split_file_header` and :func:`verify_payload`.
    """
    view = memoryview(blob).cast("B")
    metadata = split_file_header(view)
    payload = view[FILE_HEADER_SIZE:]
    return verify_payload(metadata, payload, max_payload_bytes), payload
