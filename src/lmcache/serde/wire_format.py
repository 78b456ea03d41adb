"""The byte layouts lmcache writes outside its own process: remote metadata and chunk files.

**LMCache's header** (DESIGN.md §4.5; LMCache 0.5.6 ``lmcache.v1.protocol.RemoteMetadata``
with one KV group) is 28 bytes, seven little-endian int32::

    length, fmt, dtype code, shape[0], shape[1], shape[2], shape[3]

``length`` is the payload size in bytes, ``fmt`` a :class:`MemoryFormat` value, and the dtype
codes are none 0, half 1, float16 2, bfloat16 3, float32 4, float64 5, uint8 6, fp8_e4m3fn 7,
fp8_e5m2 8 (``torch.half`` *is* ``torch.float16``; it is written as 2, and 1 and 2 both read as
float16). A shape with fewer than four dimensions fills the unused trailing slots with **0**,
as LMCache's ``pad_shape_to_4d`` does; reading strips trailing zeros (LMCache's
``strip_shape_padding``). For BINARY / BINARY_BUFFER (LMCache writes ``[length, 0, 0, 0]``)
``length`` is the truth and the shape is not checked against it.

**lmcache's trailer** follows the header wherever LMCache ignores what comes after it (the
``<key>metadata`` value, after an ``fs://`` file's payload, a side key). 28 bytes::

    b"LMc\\x02" | num_layers u32 | num_kv_heads u32 | head_size u32 | payload dtype u8 |
    KV dtype u8 | flags u8 (1 = layout known, 2 = MLA) | 0 u8 | checksum u64      (little-endian)

The layout fields say what KV the chunk holds (LMCache's header cannot tell heads from head
size); the payload dtype is exact where LMCache has no code (int8 and the fp8 ``fnuz`` types
are written as uint8 in the header). The checksum is xxh3_64 of::

    key string (UTF-8) | 0x00 | 28-byte header | first 20 trailer bytes | payload

so a flipped header field, payload byte, or a valid value stored under another key is a miss.
Metadata lmcache writes is therefore 56 bytes (:data:`METADATA_SIZE`); a 28-byte value (as
LMCache writes it) is accepted and checked by sizes (and layout) only, since it has no checksum.

Chunk files of lmcache's own disk tier (and ``lm://`` values) are::

    b"LMCACHE2" (8 bytes) | 56-byte metadata | payload                 (FILE_HEADER_SIZE = 64)

Every decoder checks sizes before trusting them (``max_payload_bytes``) and raises
:class:`WireFormatError` (a ValueError) on anything inconsistent; callers turn that into a miss.
Nothing is ever unpickled.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch
import xxhash

from lmcache.memory.memory_format import MemoryFormat

if TYPE_CHECKING:
    from lmcache.metadata import LMCacheMetadata

Buffer = Union[bytes, bytearray, memoryview]

HEADER = struct.Struct("<7i")
TRAILER_FIELDS = struct.Struct("<4sIIIBBBB")
CHECKSUM = struct.Struct("<Q")
TRAILER_MAGIC = b"LMc\x02"
LMCACHE_METADATA_SIZE = HEADER.size  # 28: what LMCache writes and reads
LEGACY_METADATA_SIZE = LMCACHE_METADATA_SIZE
TRAILER_SIZE = TRAILER_FIELDS.size + CHECKSUM.size  # 28
METADATA_SIZE = HEADER.size + TRAILER_SIZE  # 56
FILE_MAGIC = b"LMCACHE2"
FILE_HEADER_SIZE = len(FILE_MAGIC) + METADATA_SIZE  # 64
MAX_DIMS = 4
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30  # 1 GiB: far above one chunk (32 MiB for Llama-8B)
FLAG_LAYOUT = 1
FLAG_MLA = 2
_BINARY_FORMATS = (MemoryFormat.BINARY, MemoryFormat.BINARY_BUFFER)

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
# Trailer-only codes: dtypes LMCache's header has no code for (written there as uint8).
_EXTRA_CODES: dict[int, torch.dtype] = {
    9: torch.float8_e4m3fnuz,
    10: torch.float8_e5m2fnuz,
    11: torch.int8,
    12: torch.bool,
}
_TRAILER_CODE_TO_DTYPE = {**_CODE_TO_DTYPE, **_EXTRA_CODES}
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


def _trailer_code(dtype: Optional[torch.dtype]) -> int:
    dtype_to_code(dtype)
    return _TRAILER_DTYPE_TO_CODE[dtype]


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


@dataclass(frozen=True)
class Trailer:
    """lmcache's trailer, decoded: the chunk's KV layout (None when the writer did not know
    it) and the checksum (see the module docstring)."""

    layout: Optional[ChunkLayout]
    checksum: int


def _trailer_fields(meta: RemoteMetadata, layout: Optional[ChunkLayout]) -> bytes:
    if layout is None:
        return TRAILER_FIELDS.pack(TRAILER_MAGIC, 0, 0, 0, _trailer_code(meta.dtype), 0, 0, 0)
    flags = FLAG_LAYOUT | (FLAG_MLA if layout.use_mla else 0)
    return TRAILER_FIELDS.pack(TRAILER_MAGIC, layout.num_layers, layout.num_kv_heads,
                               layout.head_size, _trailer_code(meta.dtype),
                               _trailer_code(layout.kv_dtype), flags, 0)


def start_checksum(meta: RemoteMetadata, key: str = "",
                   layout: Optional[ChunkLayout] = None) -> "xxhash.xxh3_64":
    """Incremental checksum: a state already fed key, header and trailer fields; ``update()``
    it with the payload in pieces (while they are hot in cache), then :func:`finish_metadata`
    with the same ``layout``."""
    state = xxhash.xxh3_64()
    state.update(key.encode("utf-8") + b"\0")
    state.update(meta.header_bytes())
    state.update(_trailer_fields(meta, layout))
    return state


def verify_state(metadata: Buffer, key: str = "") -> "xxhash.xxh3_64":
    """A checksum state fed ``key`` and the raw header and trailer fields of 56-byte
    ``metadata`` as stored; ``update()`` it with the payload and compare its ``intdigest()``
    with the trailer's checksum."""
    state = xxhash.xxh3_64()
    state.update(key.encode("utf-8") + b"\0")
    state.update(bytes(metadata)[: HEADER.size + TRAILER_FIELDS.size])
    return state


def finish_metadata(meta: RemoteMetadata, state: "xxhash.xxh3_64",
                    layout: Optional[ChunkLayout] = None) -> bytes:
    """The 56-byte metadata whose checksum is ``state``'s digest (see start_checksum)."""
    return (meta.header_bytes() + _trailer_fields(meta, layout)
            + CHECKSUM.pack(state.intdigest()))


def encode_metadata(meta: RemoteMetadata, payload: Buffer, key: str = "",
                    layout: Optional[ChunkLayout] = None) -> bytes:
    """56 bytes: LMCache's header, then lmcache's trailer (layout and the checksum of
    key, header, trailer fields and payload).

    Args:
        meta: the payload's header fields.
        payload: the bytes stored.
        key: the key string the value is stored under ("" when there is none).
        layout: the writer's KV layout (None: not recorded, not checked on read).

    Raises:
        ValueError: ``len(payload)`` differs from ``meta.length``, or a dtype with no code.
    """
    size = memoryview(payload).nbytes
    if size != meta.length:
        raise ValueError(f"payload has {size} bytes, metadata says {meta.length}")
    state = start_checksum(meta, key, layout)
    state.update(payload)
    return finish_metadata(meta, state, layout)


def trailer_bytes(metadata: Buffer) -> bytes:
    """The 28 trailer bytes of 56-byte metadata (what follows the payload in ``fs://``)."""
    return bytes(metadata)[HEADER.size:METADATA_SIZE]


def decode_metadata(
    data: Buffer, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> tuple[RemoteMetadata, Optional[Trailer]]:
    """Parse 56-byte (lmcache) or 28-byte (LMCache) metadata into (metadata, trailer or None).

    Raises:
        WireFormatError: wrong size or trailer magic, unknown fmt or dtype code, bad shape,
            a length above ``max_payload_bytes`` or one that disagrees with shape × itemsize.
    """
    data = bytes(data)
    if len(data) not in (METADATA_SIZE, LMCACHE_METADATA_SIZE):
        raise WireFormatError(
            f"metadata is {len(data)} bytes; expected {METADATA_SIZE} or {LMCACHE_METADATA_SIZE}"
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
    if any(d < 0 for d in dims):
        raise WireFormatError(f"bad shape slots {dims} (negative)")
    trailer = None
    if len(data) == METADATA_SIZE:
        magic, layers, heads, head_size, pcode, kcode, flags, _ = TRAILER_FIELDS.unpack_from(
            data, HEADER.size)
        if magic != TRAILER_MAGIC:
            raise WireFormatError(f"trailer magic {magic!r} is not {TRAILER_MAGIC!r}")
        if pcode not in _TRAILER_CODE_TO_DTYPE or kcode not in _TRAILER_CODE_TO_DTYPE:
            raise WireFormatError(f"unknown trailer dtype codes {pcode}, {kcode}")
        exact = _TRAILER_CODE_TO_DTYPE[pcode]
        if dtype_to_code(exact) != code and not (code == 1 and exact == torch.float16):
            raise WireFormatError(f"trailer dtype {exact} disagrees with header code {code}")
        dtype = exact
        layout = None
        if flags & FLAG_LAYOUT:
            if min(layers, heads, head_size) < 1 or _TRAILER_CODE_TO_DTYPE[kcode] is None:
                raise WireFormatError(f"bad layout in trailer ({layers}, {heads}, {head_size})")
            layout = ChunkLayout(layers, heads, head_size, _TRAILER_CODE_TO_DTYPE[kcode],
                                 bool(flags & FLAG_MLA))
        trailer = Trailer(layout, CHECKSUM.unpack_from(data, HEADER.size + TRAILER_FIELDS.size)[0])
    end = MAX_DIMS
    while end > 1 and dims[end - 1] == 0:
        end -= 1
    shape = tuple(dims[:end])
    itemsize = 1 if dtype is None else dtype.itemsize
    if fmt not in _BINARY_FORMATS and math.prod(shape) * itemsize != length:
        raise WireFormatError(f"shape {shape} of {dtype} is not {length} bytes")
    return RemoteMetadata(length, fmt, dtype, shape), trailer


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


def verify_payload(
    metadata: Buffer,
    payload: Buffer,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    key: str = "",
    expect: Optional[ChunkLayout] = None,
) -> RemoteMetadata:
    """Decode ``metadata`` and check that ``payload`` is exactly what it describes, stored
    under ``key``, of layout ``expect`` (when given).

    Raises:
        WireFormatError: bad metadata, payload length disagreeing with the header, a checksum
            mismatch (payload, header, or another key), or another KV layout.
    """
    meta, trailer = decode_metadata(metadata, max_payload_bytes)
    size = memoryview(payload).nbytes
    if size != meta.length:
        raise WireFormatError(f"payload is {size} bytes but the header says {meta.length}")
    if trailer is not None:
        state = verify_state(metadata, key)
        state.update(payload)
        if state.intdigest() != trailer.checksum:
            raise WireFormatError("checksum mismatch (payload, header or key)")
    if expect is not None:
        check_layout(meta, trailer, expect)
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


def encode_file_header(meta: RemoteMetadata, payload: Buffer, key: str = "",
                       layout: Optional[ChunkLayout] = None) -> bytes:
    """The 64-byte prefix of a chunk file or single-value blob: magic then metadata."""
    return FILE_MAGIC + encode_metadata(meta, payload, key, layout)


def split_file_header(data: Buffer) -> bytes:
    """Return the 56 metadata bytes of a 64-byte file header.

    Raises:
        WireFormatError: too short or wrong magic.
    """
    view = memoryview(data)
    if view.nbytes < FILE_HEADER_SIZE or bytes(view[: len(FILE_MAGIC)]) != FILE_MAGIC:
        raise WireFormatError("not an lmcache chunk file (short or bad magic)")
    return bytes(view[len(FILE_MAGIC) : FILE_HEADER_SIZE])


def decode_blob(
    blob: Buffer, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES, key: str = "",
    expect: Optional[ChunkLayout] = None,
) -> tuple[RemoteMetadata, memoryview]:
    """Parse and verify a whole ``magic | metadata | payload`` value; payload is a view.

    Raises:
        WireFormatError: see :func:`split_file_header` and :func:`verify_payload`.
    """
    view = memoryview(blob).cast("B")
    metadata = split_file_header(view)
    payload = view[FILE_HEADER_SIZE:]
    return verify_payload(metadata, payload, max_payload_bytes, key, expect), payload
