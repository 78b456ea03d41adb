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
(:mod:`lmcache.serde.wire.remote_metadata`)

**lmcache's trailer** follows the header wherever LMCache ignores what comes after it (the
``<key>metadata`` value, after an ``fs://`` file's payload, a side key). 28 bytes::

    b"LMc\\x02" | num_layers u32 | num_kv_heads u32 | head_size u32 | payload dtype u8 |
    KV dtype u8 | flags u8 (1 = layout known, 2 = MLA) | 0 u8 | checksum u64      (little-endian)

The layout fields say what KV the chunk holds (LMCache's header cannot tell heads from head
size; :mod:`lmcache.serde.wire.chunk_layout`); the payload dtype is exact where LMCache has no
code (int8 and the fp8 ``fnuz`` types are written as uint8 in the header). The checksum is
xxh3_64 of::

    key string (UTF-8) | 0x00 | 28-byte header | first 20 trailer bytes | payload

so a flipped header field, payload byte, or a valid value stored under another key is a miss.
Metadata lmcache writes is therefore 56 bytes (``METADATA_SIZE``); a 28-byte value (as
LMCache writes it) is accepted and checked by sizes (and layout) only, since it has no checksum.
(:mod:`lmcache.serde.wire.metadata`)

Chunk files of lmcache's own disk tier (and ``lm://`` values) are::

    b"LMCACHE2" (8 bytes) | 56-byte metadata | payload                 (FILE_HEADER_SIZE = 64)

(:mod:`lmcache.serde.wire.chunk_file`)

Every decoder checks sizes before trusting them (``max_payload_bytes``) and raises
``WireFormatError`` (a ValueError) on anything inconsistent; callers turn that into a miss.
Nothing is ever unpickled.
"""
