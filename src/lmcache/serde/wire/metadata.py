"""lmcache's 56-byte metadata: LMCache's header, then lmcache's trailer (layout, checksum).

:func:`encode_metadata` writes it, :func:`decode_metadata` parses it (a 28-byte LMCache header
too), :func:`verify_payload` checks a payload against it (sizes, checksum, layout). The layout
is in :mod:`lmcache.serde.wire`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

import torch
import xxhash

from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.wire.chunk_layout import ChunkLayout, check_layout
from lmcache.serde.wire.remote_metadata import (
    BINARY_FORMATS,
    CODE_TO_DTYPE,
    DEFAULT_MAX_PAYLOAD_BYTES,
    HEADER,
    LMCACHE_METADATA_SIZE,
    MAX_DIMS,
    TRAILER_CODE_TO_DTYPE,
    Buffer,
    RemoteMetadata,
    WireFormatError,
    dtype_to_code,
    trailer_code,
)

TRAILER_FIELDS = struct.Struct("<4sIIIBBBB")
CHECKSUM = struct.Struct("<Q")
TRAILER_MAGIC = b"LMc\x02"
TRAILER_SIZE = TRAILER_FIELDS.size + CHECKSUM.size  # 28
METADATA_SIZE = HEADER.size + TRAILER_SIZE  # 56
FLAG_LAYOUT = 1
FLAG_MLA = 2


@dataclass(frozen=True)
class Trailer:
    """lmcache's trailer, decoded: the chunk's KV layout (None when the writer did not know
    it) and the checksum (see :mod:`lmcache.serde.wire`)."""

    layout: Optional[ChunkLayout]
    checksum: int


def _trailer_fields(meta: RemoteMetadata, layout: Optional[ChunkLayout]) -> bytes:
    if layout is None:
        return TRAILER_FIELDS.pack(TRAILER_MAGIC, 0, 0, 0, trailer_code(meta.dtype), 0, 0, 0)
    flags = FLAG_LAYOUT | (FLAG_MLA if layout.use_mla else 0)
    return TRAILER_FIELDS.pack(TRAILER_MAGIC, layout.num_layers, layout.num_kv_heads,
                               layout.head_size, trailer_code(meta.dtype),
                               trailer_code(layout.kv_dtype), flags, 0)


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
    if code not in CODE_TO_DTYPE:
        raise WireFormatError(f"unknown dtype code {code}")
    dtype = CODE_TO_DTYPE[code]
    if any(d < 0 for d in dims):
        raise WireFormatError(f"bad shape slots {dims} (negative)")
    trailer = None
    if len(data) == METADATA_SIZE:
        magic, layers, heads, head_size, pcode, kcode, flags, _ = TRAILER_FIELDS.unpack_from(
            data, HEADER.size)
        if magic != TRAILER_MAGIC:
            raise WireFormatError(f"trailer magic {magic!r} is not {TRAILER_MAGIC!r}")
        if pcode not in TRAILER_CODE_TO_DTYPE or kcode not in TRAILER_CODE_TO_DTYPE:
            raise WireFormatError(f"unknown trailer dtype codes {pcode}, {kcode}")
        exact = TRAILER_CODE_TO_DTYPE[pcode]
        if dtype_to_code(exact) != code and not (code == 1 and exact == torch.float16):
            raise WireFormatError(f"trailer dtype {exact} disagrees with header code {code}")
        dtype = exact
        layout = None
        if flags & FLAG_LAYOUT:
            if min(layers, heads, head_size) < 1 or TRAILER_CODE_TO_DTYPE[kcode] is None:
                raise WireFormatError(f"bad layout in trailer ({layers}, {heads}, {head_size})")
            layout = ChunkLayout(layers, heads, head_size, TRAILER_CODE_TO_DTYPE[kcode],
                                 bool(flags & FLAG_MLA))
        trailer = Trailer(layout, CHECKSUM.unpack_from(data, HEADER.size + TRAILER_FIELDS.size)[0])
    end = MAX_DIMS
    while end > 1 and dims[end - 1] == 0:
        end -= 1
    shape = tuple(dims[:end])
    itemsize = 1 if dtype is None else dtype.itemsize
    if fmt not in BINARY_FORMATS and math.prod(shape) * itemsize != length:
        raise WireFormatError(f"shape {shape} of {dtype} is not {length} bytes")
    return RemoteMetadata(length, fmt, dtype, shape), trailer


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
