"""The remote wire format (DESIGN.md §4.5 + lmcache's checksum) and key file names."""

from __future__ import annotations

import struct

import pytest
import torch
import xxhash

from lmcache.memory.memory_format import MemoryFormat
from lmcache.storage.connectors import wire_format as wf


def _payload(n: int = 64) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(range(n % 256))


def test_header_is_seven_little_endian_int32_with_design_dtype_codes():
    expected = {None: 0, torch.float16: 2, torch.bfloat16: 3, torch.float32: 4,
                torch.float64: 5, torch.uint8: 6, torch.float8_e4m3fn: 7, torch.float8_e5m2: 8}
    for dtype, code in expected.items():
        assert wf.dtype_to_code(dtype) == code
        itemsize = 1 if dtype is None else dtype.itemsize
        meta = wf.RemoteMetadata(2 * 3 * 4 * 5 * itemsize, MemoryFormat.KV_2LTD, dtype,
                                 (2, 3, 4, 5))
        header = meta.header_bytes()
        assert len(header) == 28
        assert header == struct.pack("<iiiiiii", meta.length, 1, code, 2, 3, 4, 5)
    assert torch.half is torch.float16  # "half 1" and "float16 2" name the same dtype
    for code in (1, 2):
        header = struct.pack("<7i", 8, 1, code, 1, 1, 1, 4)
        assert wf.decode_metadata(header)[0].dtype == torch.float16


def test_metadata_is_header_plus_xxh3_of_header_and_payload():
    payload = _payload(2 * 4 * 8 * 2 * 2)
    meta = wf.RemoteMetadata(len(payload), MemoryFormat.KV_2LTD, torch.bfloat16, (2, 4, 8, 2))
    data = wf.encode_metadata(meta, payload)
    assert len(data) == wf.METADATA_SIZE == 36
    assert data[:28] == meta.header_bytes()
    digest = struct.unpack("<Q", data[28:])[0]
    assert digest == xxhash.xxh3_64_intdigest(data[:28] + payload)
    assert wf.verify_payload(data, payload) == meta
    decoded, got_digest = wf.decode_metadata(data)
    assert decoded == meta and got_digest == digest


def test_fewer_than_four_dims_use_minus_one_slots():
    t = torch.zeros(16, 2, 8, dtype=torch.float16)  # KV_T2D [T, 2, D]
    meta = wf.RemoteMetadata.for_tensor(t, MemoryFormat.KV_T2D)
    header = meta.header_bytes()
    assert struct.unpack("<7i", header) == (512, 2, 2, 16, 2, 8, -1)
    assert wf.decode_metadata(header)[0].shape == (16, 2, 8)


def test_lmcache_written_28_byte_metadata_is_accepted_by_length():
    payload = _payload(4 * 4)
    header = struct.pack("<7i", 16, 1, 4, 1, 1, 1, 4)
    meta = wf.verify_payload(header, payload)
    assert (meta.length, meta.dtype, meta.shape) == (16, torch.float32, (1, 1, 1, 4))
    with pytest.raises(wf.WireFormatError, match="payload is 15 bytes"):
        wf.verify_payload(header, payload[:15])


@pytest.mark.parametrize(
    "fields, message",
    [
        ((16, 1, 4, 1, 1, 1, 5), "is not 16 bytes"),          # length disagrees with shape
        ((16, 9, 4, 1, 1, 1, 4), "unknown MemoryFormat"),
        ((16, 1, 42, 1, 1, 1, 4), "unknown dtype code"),
        ((-4, 1, 4, 1, 1, 1, -1), "outside"),
        ((16, 1, 4, 4, -1, 1, 1), "bad shape"),                # hole in the shape
        ((1 << 30, 1, 6, 1 << 30, -1, -1, -1), "outside"),     # above the size limit
    ],
)
def test_inconsistent_headers_are_rejected(fields, message):
    with pytest.raises(wf.WireFormatError, match=message):
        wf.decode_metadata(struct.pack("<7i", *fields), max_payload_bytes=1 << 20)


def test_wrong_sizes_and_flipped_bits_are_rejected():
    payload = bytearray(_payload(64))
    meta = wf.RemoteMetadata(64, MemoryFormat.BINARY, None, (64,))
    data = bytearray(wf.encode_metadata(meta, payload))
    with pytest.raises(wf.WireFormatError, match="expected 36 or 28"):
        wf.decode_metadata(data[:30])
    with pytest.raises(wf.WireFormatError, match="payload is 63 bytes but the header says 64"):
        wf.verify_payload(data, payload[:63])
    payload[10] ^= 1
    with pytest.raises(wf.WireFormatError, match="checksum"):
        wf.verify_payload(data, payload)
    payload[10] ^= 1
    data[4] = int(MemoryFormat.KV_2LTD)  # header field changed: checksum covers it too
    with pytest.raises(wf.WireFormatError, match="checksum"):
        wf.verify_payload(data, payload)


def test_encode_metadata_rejects_payload_of_other_length():
    meta = wf.RemoteMetadata(8, MemoryFormat.BINARY, None, (8,))
    with pytest.raises(ValueError, match="payload has 7 bytes, metadata says 8"):
        wf.encode_metadata(meta, b"1234567")
    with pytest.raises(ValueError, match="has no remote wire code"):
        wf.RemoteMetadata.for_tensor(torch.zeros(2, dtype=torch.int32), MemoryFormat.KV_2LTD)
    with pytest.raises(ValueError, match="holds 4"):
        wf.RemoteMetadata.for_tensor(torch.zeros(1, 1, 1, 1, 1), MemoryFormat.KV_2LTD)


def test_blob_layout_magic_metadata_payload():
    payload = _payload(32)
    meta = wf.RemoteMetadata(32, MemoryFormat.BINARY, torch.uint8, (32,))
    blob = wf.encode_file_header(meta, payload) + payload
    assert blob[:8] == b"LMCACHE1" and len(blob) == wf.FILE_HEADER_SIZE + 32 == 76
    got, view = wf.decode_blob(blob)
    assert got == meta and bytes(view) == payload
    with pytest.raises(wf.WireFormatError, match="bad magic"):
        wf.decode_blob(b"X" + blob[1:])
    with pytest.raises(wf.WireFormatError, match="payload is 31 bytes"):
        wf.decode_blob(blob[:-1])


@pytest.mark.parametrize("key", [
    "meta-llama/Llama-3.1-8B@1@0@b8a960cfcc69e7a5@bfloat16",
    "a%2Fb/c%25@1@0@-1f@half@tag%x%2F",
    ".hidden/..@1@0@0@half",
    "%2E",
])
def test_key_file_names_round_trip_and_hold_no_slash(key):
    name = wf.key_to_filename(key, ".kvc")
    assert "/" not in name and not name.startswith(".") and name.endswith(".kvc")
    assert wf.filename_to_key(name, ".kvc") == key


def test_bad_file_names_are_rejected():
    with pytest.raises(ValueError, match="bad escape"):
        wf.filename_to_key("a%41b.kvc", ".kvc")
    with pytest.raises(ValueError, match="does not end with"):
        wf.filename_to_key("abc.tmp", ".kvc")
    with pytest.raises(ValueError, match="longer than 255"):
        wf.key_to_filename("m" * 300)
    with pytest.raises(ValueError, match="empty or contains NUL"):
        wf.key_to_filename("")
