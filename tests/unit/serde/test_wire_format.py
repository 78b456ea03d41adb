"""The remote wire format (DESIGN.md §4.5 + lmcache's trailer: layout and a checksum covering the
key): lmcache.serde.wire."""

from __future__ import annotations

import struct

import pytest
import torch
import xxhash

from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.wire.chunk_file import FILE_HEADER_SIZE, decode_blob, encode_file_header
from lmcache.serde.wire.chunk_layout import ChunkLayout
from lmcache.serde.wire.metadata import (
    METADATA_SIZE,
    decode_metadata,
    encode_metadata,
    verify_payload,
)
from lmcache.serde.wire.remote_metadata import RemoteMetadata, WireFormatError, dtype_to_code


def _payload(n: int = 64) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(range(n % 256))


def test_header_is_seven_little_endian_int32_with_design_dtype_codes():
    expected = {None: 0, torch.float16: 2, torch.bfloat16: 3, torch.float32: 4,
                torch.float64: 5, torch.uint8: 6, torch.float8_e4m3fn: 7, torch.float8_e5m2: 8}
    for dtype, code in expected.items():
        assert dtype_to_code(dtype) == code
        itemsize = 1 if dtype is None else dtype.itemsize
        meta = RemoteMetadata(2 * 3 * 4 * 5 * itemsize, MemoryFormat.KV_2LTD, dtype,
                                 (2, 3, 4, 5))
        header = meta.header_bytes()
        assert len(header) == 28
        assert header == struct.pack("<iiiiiii", meta.length, 1, code, 2, 3, 4, 5)
    assert torch.half is torch.float16  # "half 1" and "float16 2" name the same dtype
    for code in (1, 2):
        header = struct.pack("<7i", 8, 1, code, 1, 1, 1, 4)
        assert decode_metadata(header)[0].dtype == torch.float16


LAYOUT = ChunkLayout(4, 1, 2, torch.bfloat16, False, 8)


def test_metadata_is_header_then_trailer_with_layout_and_xxh3_of_key_header_payload():
    payload = _payload(2 * 4 * 8 * 2 * 2)
    key = "m@1@0@ab@bfloat16"
    meta = RemoteMetadata(len(payload), MemoryFormat.KV_2LTD, torch.bfloat16, (2, 4, 8, 2))
    data = encode_metadata(meta, payload, key, LAYOUT)
    assert len(data) == METADATA_SIZE == 56
    assert data[:28] == meta.header_bytes()
    fields = struct.unpack("<4sIIIBBBB", data[28:48])
    assert fields == (b"LMc\x02", 4, 1, 2, 3, 3, 1, 0)  # layers, heads, head size, dtypes, flags
    digest = struct.unpack("<Q", data[48:])[0]
    assert digest == xxhash.xxh3_64_intdigest(key.encode() + b"\0" + data[:48] + payload)
    assert verify_payload(data, payload, key=key, expect=LAYOUT) == meta
    decoded, trailer = decode_metadata(data)
    assert decoded == meta and trailer.checksum == digest
    assert trailer.layout == ChunkLayout(4, 1, 2, torch.bfloat16, False)


def test_checksum_covers_the_key():
    payload = _payload(64)
    meta = RemoteMetadata(64, MemoryFormat.BINARY, None, (64,))
    data = encode_metadata(meta, payload, "model@1@0@aa@half")
    assert verify_payload(data, payload, key="model@1@0@aa@half") == meta
    with pytest.raises(WireFormatError, match="checksum"):
        verify_payload(data, payload, key="model@1@0@ab@half")


@pytest.mark.parametrize("other", [
    ChunkLayout(4, 2, 1, torch.bfloat16, False),    # same D = 2, heads and head size swapped
    ChunkLayout(4, 1, 2, torch.float16, False),     # other dtype, same byte size
    ChunkLayout(4, 1, 2, torch.bfloat16, True),     # MLA
    ChunkLayout(2, 1, 2, torch.bfloat16, False),    # other layer count
])
def test_a_chunk_of_another_layout_is_rejected_even_with_the_same_byte_size(other):
    payload = _payload(2 * 4 * 8 * 2 * 2)
    meta = RemoteMetadata(len(payload), MemoryFormat.KV_2LTD, torch.bfloat16, (2, 4, 8, 2))
    data = encode_metadata(meta, payload, "k", other)
    with pytest.raises(WireFormatError, match="another KV layout"):
        verify_payload(data, payload, key="k", expect=LAYOUT)


def test_lmcache_header_without_trailer_is_checked_against_the_layout():
    payload = _payload(2 * 4 * 8 * 2 * 2)
    ok = struct.pack("<7i", len(payload), 1, 3, 2, 4, 8, 2)
    assert verify_payload(ok, payload, key="k", expect=LAYOUT).shape == (2, 4, 8, 2)
    for fields, what in [((len(payload), 1, 2, 2, 4, 8, 2), "dtype"),          # fp16
                         ((len(payload), 1, 3, 2, 2, 16, 2), "shape"),         # 2 layers
                         ((len(payload), 6, 3, 1, 4, 16, 2), "shape"),         # MLA fmt
                         ((len(payload), 1, 3, 2, 4, 4, 4), "shape"),          # D = 4
                         ((len(payload) * 2, 1, 3, 2, 4, 16, 2), "payload is")]:
        with pytest.raises(WireFormatError, match=what):
            verify_payload(struct.pack("<7i", *fields), payload, expect=LAYOUT)
    big = ChunkLayout(4, 1, 2, torch.bfloat16, False, 4)  # chunk_size 4 < 8 tokens
    with pytest.raises(WireFormatError, match="tokens"):
        verify_payload(ok, payload, expect=big)


def test_one_byte_dtypes_without_lmcache_code_go_as_uint8_with_exact_dtype_in_trailer():
    for dtype in (torch.int8, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.bool):
        t = torch.zeros(2, 1, 4, 6, dtype=dtype)
        meta = RemoteMetadata.for_tensor(t, MemoryFormat.KV_2LTD)
        data = encode_metadata(meta, bytes(48), "k")
        assert struct.unpack_from("<7i", data)[2] == 6
        assert decode_metadata(data)[0].dtype == dtype
        assert decode_metadata(data[:28])[0].dtype == torch.uint8


def test_fewer_than_four_dims_pad_with_zero_as_lmcache():
    t = torch.zeros(16, 2, 8, dtype=torch.float16)  # KV_T2D [T, 2, D]
    meta = RemoteMetadata.for_tensor(t, MemoryFormat.KV_T2D)
    header = meta.header_bytes()
    assert struct.unpack("<7i", header) == (512, 2, 2, 16, 2, 8, 0)
    assert decode_metadata(header)[0].shape == (16, 2, 8)
    binary = struct.pack("<7i", 10, int(MemoryFormat.BINARY), 6, 10, 0, 0, 0)  # LMCache's
    assert decode_metadata(binary)[0].shape == (10,)


def test_lmcache_written_28_byte_metadata_is_accepted_by_length():
    payload = _payload(4 * 4)
    header = struct.pack("<7i", 16, 1, 4, 1, 1, 1, 4)
    meta = verify_payload(header, payload)
    assert (meta.length, meta.dtype, meta.shape) == (16, torch.float32, (1, 1, 1, 4))
    with pytest.raises(WireFormatError, match="payload is 15 bytes"):
        verify_payload(header, payload[:15])


@pytest.mark.parametrize(
    "fields, message",
    [
        ((16, 1, 4, 1, 1, 1, 5), "is not 16 bytes"),          # length disagrees with shape
        ((16, 9, 4, 1, 1, 1, 4), "unknown MemoryFormat"),
        ((16, 1, 42, 1, 1, 1, 4), "unknown dtype code"),
        ((-4, 1, 4, 1, 1, 1, 0), "outside"),
        ((16, 1, 4, 4, -1, 1, 1), "bad shape"),                # negative slot
        ((16, 2, 4, 4, 1, 1, -1), "bad shape"),                # lmcache's old -1 padding
        ((1 << 30, 1, 6, 1 << 30, 0, 0, 0), "outside"),        # above the size limit
    ],
)
def test_inconsistent_headers_are_rejected(fields, message):
    with pytest.raises(WireFormatError, match=message):
        decode_metadata(struct.pack("<7i", *fields), max_payload_bytes=1 << 20)


def test_wrong_sizes_and_flipped_bits_are_rejected():
    payload = bytearray(_payload(64))
    meta = RemoteMetadata(64, MemoryFormat.BINARY, None, (64,))
    data = bytearray(encode_metadata(meta, payload))
    with pytest.raises(WireFormatError, match="expected 56 or 28"):
        decode_metadata(data[:36])
    with pytest.raises(WireFormatError, match="trailer magic"):
        decode_metadata(bytes(data[:28]) + b"XXXX" + bytes(data[32:]))
    with pytest.raises(WireFormatError, match="payload is 63 bytes but the header says 64"):
        verify_payload(data, payload[:63])
    payload[10] ^= 1
    with pytest.raises(WireFormatError, match="checksum"):
        verify_payload(data, payload)
    payload[10] ^= 1
    data[4] = int(MemoryFormat.KV_2LTD)  # header field changed: checksum covers it too
    with pytest.raises(WireFormatError, match="checksum"):
        verify_payload(data, payload)


def test_encode_metadata_rejects_payload_of_other_length():
    meta = RemoteMetadata(8, MemoryFormat.BINARY, None, (8,))
    with pytest.raises(ValueError, match="payload has 7 bytes, metadata says 8"):
        encode_metadata(meta, b"1234567")
    with pytest.raises(ValueError, match="has no remote wire code"):
        RemoteMetadata.for_tensor(torch.zeros(2, dtype=torch.int32), MemoryFormat.KV_2LTD)
    with pytest.raises(ValueError, match="holds 4"):
        RemoteMetadata.for_tensor(torch.zeros(1, 1, 1, 1, 1), MemoryFormat.KV_2LTD)


def test_blob_layout_magic_metadata_payload():
    payload = _payload(32)
    meta = RemoteMetadata(32, MemoryFormat.BINARY, torch.uint8, (32,))
    blob = encode_file_header(meta, payload) + payload
    assert blob[:8] == b"LMCACHE2" and len(blob) == FILE_HEADER_SIZE + 32 == 96
    got, view = decode_blob(blob)
    assert got == meta and bytes(view) == payload
    with pytest.raises(WireFormatError, match="bad magic"):
        decode_blob(b"X" + blob[1:])
    with pytest.raises(WireFormatError, match="payload is 31 bytes"):
        decode_blob(blob[:-1])
