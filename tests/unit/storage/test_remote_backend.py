"""RemoteBackend over the fs:// and blackhole:// connectors (real files, no server needed)."""

from __future__ import annotations

import logging
import os
import struct
import threading

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.naive import NaiveSerde
from lmcache.serde.wire.metadata import TRAILER_MAGIC, verify_payload
from lmcache.storage.backends.remote import RemoteBackend
from lmcache.storage.connectors.blackhole import BlackholeConnector
from lmcache.storage.connectors.fs import FSConnector, file_name

SHAPE = (2, 2, 16, 32)


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("org/model", 2, 1, 0x5EED00 + i, torch.float16)


@pytest.fixture
def fs_remote(cpu, tmp_path):
    remote = RemoteBackend(cpu, NaiveSerde(), FSConnector(f"fs://{tmp_path}/remote"),
                           blocking_timeout_secs=30)
    yield remote
    remote.close()


def put_chunks(remote, cpu, ids):
    ref = {}
    for i in ids:
        obj = cpu.allocate(SHAPE, torch.float16, MemoryFormat.KV_2LTD)
        obj.tensor.copy_(torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)))
        ref[i] = obj.tensor.clone()
        remote.put(key(i), obj)
        obj.ref_count_down()
    assert remote.flush(timeout=60)
    return ref


def test_round_trip_through_files(fs_remote, cpu, tmp_path):
    ref = put_chunks(fs_remote, cpu, range(3))
    names = sorted(os.listdir(tmp_path / "remote"))
    assert names == [file_name(key(i).to_string()) for i in range(3)]
    assert names[0] == "org-SEP-model@2@1@5eed00@half.data"  # LMCache's FSConnector name
    assert fs_remote.batched_contains([key(0), key(1), key(5), key(2)]) == 2
    objs = fs_remote.batched_get_blocking([key(i) for i in range(4)])
    assert objs[3] is None
    for i in range(3):
        assert objs[i].get_ref_count() == 1 and torch.equal(objs[i].tensor, ref[i])
        objs[i].ref_count_down()
    assert fs_remote.stats["puts"] == 3 and fs_remote.stats["hits"] == 3
    assert not fs_remote.unpin(key(0))


def test_a_second_instance_sees_the_shared_store(cpu, fs_remote, tmp_path):
    ref = put_chunks(fs_remote, cpu, [4])
    other = RemoteBackend(cpu, NaiveSerde(), FSConnector(f"fs://{tmp_path}/remote"))
    try:
        got = other.get_blocking(key(4))
        assert torch.equal(got.tensor, ref[4])
        got.ref_count_down()
        assert other.clear() == 0 and other.contains(key(4))  # clear leaves the shared store
        assert other.remove(key(4)) and not fs_remote.contains(key(4))
    finally:
        other.close()


def _file(tmp_path, i):
    return tmp_path / "remote" / file_name(key(i).to_string())


@pytest.mark.parametrize("damage", ["payload_bit", "length_field", "truncated", "magic"])
def test_damaged_remote_bytes_are_misses(fs_remote, cpu, tmp_path, damage, caplog):
    put_chunks(fs_remote, cpu, [1])
    path = _file(tmp_path, 1)
    data = bytearray(path.read_bytes())
    if damage == "payload_bit":
        data[500] ^= 1
    elif damage == "length_field":  # header length disagrees with the payload
        struct.pack_into("<i", data, 0, len(data) - 56 - 2)
    elif damage == "truncated":
        data = data[:-2]
    else:  # lmcache's trailer after the payload
        data[-28:-24] = b"NOTL"
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert fs_remote.get_blocking(key(1)) is None
    assert cpu.allocator.num_active_allocations == 0


def test_lmcache_legacy_28_byte_header_is_read(fs_remote, cpu, tmp_path):
    put_chunks(fs_remote, cpu, [2])
    path = _file(tmp_path, 2)
    data = path.read_bytes()
    payload = data[28:-28]
    header = struct.pack("<7i", len(payload), 1, 2, *SHAPE)
    assert data[:28] == header and data[-28:-24] == TRAILER_MAGIC
    # a value whose metadata carries no checksum is still checked by length
    got = fs_remote.serde.deserialize(verify_payload(header, payload), payload, cpu)
    assert bytes(got.byte_array) == payload
    got.ref_count_down()


def test_queued_upload_is_served_from_memory_and_clear_drops_the_queue(cpu, tmp_path):
    remote = RemoteBackend(cpu, NaiveSerde(), FSConnector(f"fs://{tmp_path}/r"),
                           num_put_workers=1)
    gate = threading.Event()
    remote._putters.submit(gate.wait, 60)          # park the only upload thread
    try:
        obj = cpu.allocate(SHAPE, torch.float16, MemoryFormat.KV_2LTD)
        obj.tensor.fill_(3)
        remote.put(key(0), obj)
        assert obj.get_ref_count() == 2            # the tier's own reference
        obj.ref_count_down()
        assert remote.contains(key(0))
        got = remote.get_blocking(key(0))
        assert got is obj and bool((got.tensor == 3).all())
        got.ref_count_down()
        assert remote.clear() == 1
    finally:
        gate.set()
    assert remote.flush(timeout=60)
    remote.close()
    assert os.listdir(tmp_path / "r") == []        # the cleared upload was never sent
    assert cpu.allocator.num_active_allocations == 0


def test_blackhole_drops_everything(cpu):
    remote = RemoteBackend(cpu, NaiveSerde(), BlackholeConnector("blackhole://"))
    put_chunks(remote, cpu, range(3))
    assert remote.connector.stats["dropped_puts"] == 3
    assert remote.batched_contains([key(0)]) == 0 and remote.get_blocking(key(0)) is None
    remote.close()
    remote.close()
    remote.put(key(9), None)  # after close: ignored


def test_bad_collaborators_and_values(cpu, tmp_path):
    conn = FSConnector(f"fs://{tmp_path}/x")
    with pytest.raises(TypeError, match="remote_connector must be a RemoteConnector"):
        RemoteBackend(cpu, NaiveSerde(), None)
    with pytest.raises(TypeError, match="serde must be a Serde"):
        RemoteBackend(cpu, "naive", conn)
    with pytest.raises(ValueError, match="blocking_timeout_secs must be > 0, got 0"):
        RemoteBackend(cpu, NaiveSerde(), conn, blocking_timeout_secs=0)
    with pytest.raises(ValueError, match="fs://"):
        FSConnector("valkey://localhost:6379")
    with pytest.raises(ValueError, match="blackhole://"):
        BlackholeConnector("fs:///tmp")


def test_kv_dtype_the_wire_cannot_carry_is_refused_at_start(cpu, tmp_path):
    from lmcache.metadata import LMCacheMetadata

    conn = FSConnector(f"fs://{tmp_path}/d")
    for ok in (torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.int8,
               torch.float8_e4m3fn, torch.float8_e5m2):
        meta = LMCacheMetadata("org/m", 1, 0, ok, (2, 2, 16, 2, 8))
        RemoteBackend(cpu, NaiveSerde(), conn, metadata=meta).close()
    meta = LMCacheMetadata("org/m", 1, 0, torch.int32, (2, 2, 16, 2, 8))
    with pytest.raises(ValueError, match=r"remote tier cannot hold KV of dtype torch.int32"):
        RemoteBackend(cpu, NaiveSerde(), FSConnector(f"fs://{tmp_path}/e"), metadata=meta)


def test_contains_deadline_lies_inside_the_lookup_deadline(cpu, tmp_path):
    def make(**kw):
        return RemoteBackend(cpu, NaiveSerde(), FSConnector(f"fs://{tmp_path}/t"), **kw)

    for kw, want in (({}, 1.0), ({"lookup_timeout_ms": 600}, 0.2),
                     ({"lookup_timeout_ms": 3000, "contains_timeout_secs": 2.5}, 2.5)):
        remote = make(**kw)
        assert remote.contains_timeout_secs == pytest.approx(want)
        remote.close()
    with pytest.raises(ValueError, match=r"contains_timeout_secs=3\.0 .* below "
                                         r"lookup_timeout_ms=3000"):
        make(lookup_timeout_ms=3000, contains_timeout_secs=3.0)
