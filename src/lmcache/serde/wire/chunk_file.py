"""The chunk file / single-value blob: ``b"LMCACHE2" | 56-byte metadata | payload``.

Used by lmcache's own disk tier and ``lm://`` values (layout: :mod:`lmcache.serde.wire`).
"""

from __future__ import annotations

from typing import Optional

from lmcache.serde.wire.chunk_layout import ChunkLayout
from lmcache.serde.wire.metadata import METADATA_SIZE, encode_metadata, verify_payload
from lmcache.serde.wire.remote_metadata import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Buffer,
    RemoteMetadata,
    WireFormatError,
)

FILE_MAGIC = b"LMCACHE2"
FILE_HEADER_SIZE = len(FILE_MAGIC) + METADATA_SIZE  # 64


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
