"""disk_files.read_into / write_file on real files: payloads of several BLOCKs, every byte
verified, every kind of damage a miss (a description), never a loaded chunk."""

from __future__ import annotations

import os
import struct

import pytest
import torch

from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.wire.chunk_file import FILE_HEADER_SIZE, FILE_MAGIC
from lmcache.serde.wire.chunk_layout import ChunkLayout
from lmcache.serde.wire.remote_metadata import RemoteMetadata
from lmcache.storage.backends import disk_files
from lmcache.storage.backends.disk_names import filename_to_key

SHAPE = (2, 5, 256, 1024)  # 5 MiB of bf16: the header read, 5 BLOCK reads (last one partial)


@pytest.fixture
def alloc():
    a = CPUMemoryAllocator(16 << 20, pin_memory=False)
    yield a
    a.close()


def new_obj(alloc, fill=None):
    obj = alloc.allocate(SHAPE, torch.bfloat16, MemoryFormat.KV_2LTD)
    if fill is not None:
        obj.tensor.copy_(fill)
    return obj


LAYOUT = ChunkLayout(5, 8, 128, torch.bfloat16, False, 256)  # D = 1024


def written(alloc, path, layout=None):
    value = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    src = new_obj(alloc, value)
    key = filename_to_key(os.path.basename(path), disk_files.SUFFIX)
    disk_files.write_file(str(path), RemoteMetadata.for_tensor(src.tensor, src.fmt),
                          src.byte_array, key, layout)
    src.ref_count_down()
    return value


def read(alloc, path, layout=None):
    obj = new_obj(alloc)
    try:
        problem = disk_files.read_into(str(path), obj, 1 << 30, layout)
        return problem, (obj.tensor.clone() if problem is None else None)
    finally:
        obj.ref_count_down()


def test_multi_block_round_trip(alloc, tmp_path):
    path = tmp_path / "c.kvc"
    value = written(alloc, path)
    assert os.path.getsize(path) == FILE_HEADER_SIZE + 5 * (1 << 20)
    assert disk_files.BLOCK == 1 << 20
    problem, got = read(alloc, path)
    assert problem is None and torch.equal(got, value)


@pytest.mark.parametrize("offset", [FILE_HEADER_SIZE, disk_files.BLOCK - 1,
                                    disk_files.BLOCK, 3 * disk_files.BLOCK + 7,
                                    FILE_HEADER_SIZE + 5 * (1 << 20) - 1])
def test_a_flipped_payload_byte_anywhere_is_caught(alloc, tmp_path, offset):
    path = tmp_path / "c.kvc"
    written(alloc, path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))
    assert read(alloc, path) == ("corrupt (checksum mismatch)", None)


def test_damaged_headers_and_sizes(alloc, tmp_path):
    path = tmp_path / "c.kvc"
    written(alloc, path)
    data = path.read_bytes()
    path.write_bytes(data[:10])  # torn inside the header
    problem, _ = read(alloc, path)
    assert problem.startswith("corrupt") and "no complete header" in problem
    path.write_bytes(b"NOTLMCAC" + data[8:])
    assert read(alloc, path)[0].startswith("corrupt (not an lmcache chunk file")
    path.write_bytes(data[:-5])  # torn payload
    assert read(alloc, path)[0] == f"truncated or mismatched ({len(data) - 5} bytes)"
    shape_field = len(FILE_MAGIC) + 12  # shape[0] of the 28-byte header
    other = bytearray(data)
    other[shape_field:shape_field + 4] = struct.pack("<i", 1)  # header of another shape
    path.write_bytes(bytes(other))
    assert read(alloc, path)[0].startswith("corrupt")  # length/shape disagree
    legacy = bytearray(data)
    legacy[FILE_HEADER_SIZE - 8:FILE_HEADER_SIZE] = bytes(8)  # checksum zeroed
    path.write_bytes(bytes(legacy))
    assert read(alloc, path)[0] == "corrupt (checksum mismatch)"


def test_missing_file_raises_file_not_found(alloc, tmp_path):
    obj = new_obj(alloc)
    with pytest.raises(FileNotFoundError):
        disk_files.read_into(str(tmp_path / "gone.kvc"), obj, 1 << 30)
    obj.ref_count_down()


def test_a_valid_file_under_another_key_name_is_a_miss(alloc, tmp_path):
    path = tmp_path / "m@1@0@aa@bfloat16.kvc"
    value = written(alloc, path, LAYOUT)
    assert read(alloc, path, LAYOUT)[1].equal(value)
    other = tmp_path / "m@1@0@ab@bfloat16.kvc"
    other.write_bytes(path.read_bytes())  # a valid chunk copied to another key's file
    assert read(alloc, other, LAYOUT) == ("corrupt (checksum mismatch)", None)


def test_a_file_of_another_layout_is_a_miss_and_not_indexed(alloc, tmp_path):
    path = tmp_path / "m@1@0@aa@bfloat16.kvc"
    other = ChunkLayout(5, 16, 64, torch.bfloat16, False, 256)  # same D, same byte size
    written(alloc, path, other)
    problem, _ = read(alloc, path, LAYOUT)
    assert problem.startswith("corrupt (chunk of another KV layout: num_kv_heads is 16")
    assert disk_files.scan(str(tmp_path), 1 << 30, LAYOUT) == []
    assert path.exists()  # another instance's file: left alone
    assert [k.to_string() for k, _, _ in disk_files.scan(str(tmp_path), 1 << 30, other)] == \
        ["m@1@0@aa@bfloat16"]
