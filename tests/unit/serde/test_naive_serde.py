"""NaiveSerde: raw bytes out, the same tensor back in allocator memory."""

from __future__ import annotations

import pytest
import torch

from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.naive import NaiveSerde
from lmcache.serde.wire.remote_metadata import RemoteMetadata


@pytest.fixture
def cpu(make_cpu_backend):
    return make_cpu_backend(1)


@pytest.mark.parametrize("dtype, shape, fmt", [
    (torch.bfloat16, (2, 3, 16, 8), MemoryFormat.KV_2LTD),
    (torch.float16, (16, 2, 8), MemoryFormat.KV_T2D),
    (torch.float32, (2, 16, 8), MemoryFormat.KV_2TD),
    (torch.float8_e4m3fn, (1, 3, 16, 8), MemoryFormat.KV_MLA_FMT),
    (torch.uint8, (100,), MemoryFormat.BINARY),
])
def test_round_trip_is_bit_exact(cpu, dtype, shape, fmt):
    serde = NaiveSerde()
    obj = cpu.allocate(shape, dtype, fmt)
    source = torch.randint(0, 256, (obj.nbytes,), dtype=torch.uint8)
    obj.raw_data.copy_(source)
    meta, payload = serde.serialize(obj)
    assert (meta.length, meta.fmt, meta.dtype, meta.shape) == (obj.nbytes, fmt, dtype, shape)
    assert bytes(payload) == source.numpy().tobytes()
    wire = bytes(payload)  # what a connector would send
    obj.ref_count_down()
    back = serde.deserialize(meta, wire, cpu)
    assert back.get_ref_count() == 1
    assert (back.shape, back.dtype, back.fmt) == (torch.Size(shape), dtype, fmt)
    assert torch.equal(back.raw_data, source)
    back.ref_count_down()


def test_raw_bytes_dtype_none_become_uint8(cpu):
    meta = RemoteMetadata(5, MemoryFormat.BINARY, None, (5,))
    back = NaiveSerde().deserialize(meta, b"hello", cpu)
    assert back.dtype == torch.uint8 and bytes(back.byte_array) == b"hello"
    back.ref_count_down()


def test_no_memory_is_none_and_bad_length_is_valueerror(cpu):
    serde = NaiveSerde()
    big = RemoteMetadata(4 << 20, MemoryFormat.BINARY, torch.uint8, (4 << 20,))
    assert serde.deserialize(big, bytes(4 << 20), cpu) is None
    meta = RemoteMetadata(8, MemoryFormat.BINARY, torch.uint8, (8,))
    with pytest.raises(ValueError, match="payload is 7 bytes, metadata says 8"):
        serde.deserialize(meta, b"1234567", cpu)
