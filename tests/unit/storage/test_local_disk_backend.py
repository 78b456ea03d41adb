"""LocalDiskBackend with real files: round trip, restart, corruption, eviction, pins."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.wire.chunk_file import FILE_HEADER_SIZE, FILE_MAGIC
from lmcache.serde.wire.metadata import verify_payload
from lmcache.storage.backends.disk_names import key_to_filename
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.policy.lru import LRUCachePolicy

SHAPE = (2, 2, 16, 32)  # [2, L, T, D] bf16: 4 KiB per chunk
CHUNK_FILE = FILE_HEADER_SIZE + 2 * 2 * 16 * 32 * 2
MODEL = "meta-llama/Llama-3.1-8B"


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey(MODEL, 1, 0, 0xABC000 + i, torch.bfloat16)


@pytest.fixture
def make_disk(cpu, tmp_path):
    made = []

    def make(chunks: int = 100, **kw) -> LocalDiskBackend:
        kw.setdefault("local_disk", str(tmp_path / "disk"))
        disk = LocalDiskBackend(cpu, LRUCachePolicy(), max_local_disk_size=chunks * CHUNK_FILE
                                / (1 << 30), **kw)
        made.append(disk)
        return disk

    yield make
    for disk in made:
        disk.close()


def chunk(cpu: LocalCPUBackend, seed: int):
    obj = cpu.allocate(SHAPE, torch.bfloat16, MemoryFormat.KV_2LTD)
    obj.tensor.copy_(torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)))
    return obj


def store(disk: LocalDiskBackend, cpu: LocalCPUBackend, ids) -> dict[int, torch.Tensor]:
    """Put chunks like the StorageManager does (tier takes a ref, producer's ref dropped)."""
    ref = {}
    for i in ids:
        obj = chunk(cpu, i)
        ref[i] = obj.tensor.clone()
        disk.put(key(i), obj)
        obj.ref_count_down()
    assert disk.flush(timeout=60)
    return ref


def read(disk: LocalDiskBackend, i: int):
    obj = disk.get_blocking(key(i))
    if obj is None:
        return None
    value = obj.tensor.clone()
    obj.ref_count_down()
    return value


def test_round_trip_file_name_and_layout(cpu, make_disk, tmp_path):
    disk = make_disk()
    ref = store(disk, cpu, [1])
    files = os.listdir(tmp_path / "disk")
    assert files == ["meta-llama%2FLlama-3.1-8B@1@0@abc001@bfloat16.kvc"]
    data = (tmp_path / "disk" / files[0]).read_bytes()
    assert len(data) == CHUNK_FILE and data[:8] == FILE_MAGIC
    h = FILE_HEADER_SIZE
    meta = verify_payload(data[8:h], data[h:], key=key(1).to_string())
    assert (meta.fmt, meta.dtype, meta.shape) == (MemoryFormat.KV_2LTD, torch.bfloat16, SHAPE)
    assert data[h:] == ref[1].view(torch.uint8).numpy().tobytes()
    assert disk.contains(key(1)) and not disk.contains(key(2))
    got = disk.get_blocking(key(1))
    assert got.get_ref_count() == 1 and got.fmt == MemoryFormat.KV_2LTD
    assert torch.equal(got.tensor, ref[1])
    got.ref_count_down()
    assert disk.get_blocking(key(2)) is None
    assert disk.used_bytes == CHUNK_FILE and disk.stats["writes"] == 1


def test_restart_rebuilds_index_and_usage(cpu, make_disk, tmp_path):
    disk = make_disk()
    ref = store(disk, cpu, range(5))
    disk.close()
    d = tmp_path / "disk"
    (d / (".tmp-lmcache-" + "ab" * 16)).write_bytes(b"half a write")  # our interrupted write
    (d / ".tmp-deadbeef").write_bytes(b"another program's")      # left alone (7.12)
    (d / "notes.txt").write_text("not ours")                     # left alone
    (d / "junk.kvc").write_bytes(b"x" * 100)                     # not an encoded key: left alone
    os.truncate(d / key_to_filename(key(4).to_string(), ".kvc"), CHUNK_FILE - 10)  # torn
    again = make_disk()
    assert sorted(os.listdir(d)) == sorted(
        [key_to_filename(key(i).to_string(), ".kvc") for i in range(4)]
        + ["notes.txt", ".tmp-deadbeef", "junk.kvc"])
    assert len(again) == 4 and again.used_bytes == 4 * CHUNK_FILE
    assert again.batched_contains([key(i) for i in range(6)]) == 4
    for i in range(4):
        assert torch.equal(read(again, i), ref[i])
    assert read(again, 4) is None


def test_corrupt_byte_is_a_miss_and_file_is_removed(cpu, make_disk, tmp_path, caplog):
    disk = make_disk()
    store(disk, cpu, [7])
    path = tmp_path / "disk" / key_to_filename(key(7).to_string(), ".kvc")
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x40
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert disk.get_blocking(key(7)) is None
    assert "checksum mismatch" in caplog.text
    assert not path.exists() and not disk.contains(key(7))
    assert disk.stats["corrupt"] == 1 and disk.used_bytes == 0


def test_file_truncated_while_running_is_a_miss(cpu, make_disk, tmp_path):
    disk = make_disk()
    store(disk, cpu, [3])
    path = tmp_path / "disk" / key_to_filename(key(3).to_string(), ".kvc")
    os.truncate(path, 100)
    assert disk.get_blocking(key(3)) is None
    assert not path.exists() and disk.stats["corrupt"] == 1


def test_capacity_evicts_in_lru_order(cpu, make_disk):
    disk = make_disk(chunks=3)
    store(disk, cpu, [0, 1, 2])
    assert read(disk, 0) is not None  # 0 becomes most recently used
    store(disk, cpu, [3])
    assert [disk.contains(key(i)) for i in range(4)] == [True, False, True, True]
    assert disk.used_bytes == 3 * CHUNK_FILE and disk.stats["evictions"] == 1


def test_pinned_chunks_are_not_evicted(cpu, make_disk):
    disk = make_disk(chunks=2)
    store(disk, cpu, [0, 1])
    assert disk.batched_contains([key(0), key(1)], pin=True) == 2
    store(disk, cpu, [2])
    assert not disk.contains(key(2)) and disk.stats["dropped_capacity"] == 1
    assert disk.unpin(key(0)) and not disk.unpin(key(0))
    store(disk, cpu, [3])
    assert [disk.contains(key(i)) for i in range(4)] == [False, True, False, True]
    assert not disk.unpin(key(5))


def test_remove_clear_and_duplicate_puts(cpu, make_disk, tmp_path):
    disk = make_disk()
    store(disk, cpu, [0, 1, 2])
    store(disk, cpu, [1])  # already stored: nothing new written
    assert disk.stats["writes"] == 3
    assert disk.remove(key(1)) and not disk.remove(key(1))
    assert disk.used_bytes == 2 * CHUNK_FILE
    assert disk.clear() == 2
    assert os.listdir(tmp_path / "disk") == [] and disk.used_bytes == 0 and len(disk) == 0


def test_parallel_batched_get_and_non_blocking(cpu, make_disk):
    disk = make_disk()
    ref = store(disk, cpu, range(6))
    objs = disk.batched_get_blocking([key(i) for i in range(7)])
    assert objs[6] is None
    for i in range(6):
        assert torch.equal(objs[i].tensor, ref[i])
        objs[i].ref_count_down()
    futures = disk.batched_get_non_blocking([key(2), key(9)])
    first, missing = (f.result(timeout=60) for f in futures)
    assert missing is None and torch.equal(first.tensor, ref[2])
    first.ref_count_down()


def test_close_finishes_queued_writes(cpu, make_disk):
    disk = make_disk(num_writers=1)
    ref = {}
    for i in range(8):
        obj = chunk(cpu, i)
        ref[i] = obj.tensor.clone()
        disk.put(key(i), obj)
        obj.ref_count_down()
    disk.close()
    again = make_disk()
    assert len(again) == 8 and all(torch.equal(read(again, i), ref[i]) for i in range(8))


def test_no_memory_for_a_read_is_a_miss_that_keeps_the_file(cpu, make_disk):
    disk = make_disk()
    store(disk, cpu, [0])
    held = []
    while (obj := cpu.allocate(SHAPE, torch.bfloat16, MemoryFormat.KV_2LTD)) is not None:
        held.append(obj)
    assert disk.get_blocking(key(0)) is None and disk.contains(key(0))
    for obj in held:
        obj.ref_count_down()
    assert read(disk, 0) is not None


def test_policy_instance_is_not_shared_and_bad_arguments(cpu, tmp_path):
    policy = LRUCachePolicy()
    disk = LocalDiskBackend(cpu, policy, local_disk=f"file://{tmp_path}/d", max_local_disk_size=1)
    assert isinstance(disk.policy, LRUCachePolicy) and disk.policy is not policy
    assert disk.path == f"{tmp_path}/d" and disk.capacity_bytes == 1 << 30
    disk.close()
    with pytest.raises(ValueError, match="local_disk must be a directory path, got None"):
        LocalDiskBackend(cpu, policy, local_disk=None, max_local_disk_size=1)
    with pytest.raises(ValueError, match="max_local_disk_size must be > 0 GiB, got 0"):
        LocalDiskBackend(cpu, policy, local_disk=str(tmp_path), max_local_disk_size=0)
    with pytest.raises(ValueError, match="num_writers"):
        LocalDiskBackend(cpu, policy, local_disk=str(tmp_path), max_local_disk_size=1,
                         num_writers=0)


def test_tensor_parallel_ranks_keep_their_own_files(tmp_path):
    """Rank 1 started on rank 0's directory neither indexes, counts nor evicts rank 0's files."""
    from lmcache.memory.cpu import CPUMemoryAllocator
    from lmcache.metadata import LMCacheMetadata
    from lmcache.storage.backends.local_cpu import LocalCPUBackend
    from lmcache.storage.backends.local_disk import LocalDiskBackend
    from lmcache.storage.policy.lru import LRUCachePolicy

    allocator = CPUMemoryAllocator(1 << 20)
    cpu = LocalCPUBackend(allocator, LRUCachePolicy())
    tiers = []
    for rank in (0, 1):
        meta = LMCacheMetadata("m", 2, rank, torch.float32, (1, 2, 4, 1, 2))
        tiers.append(LocalDiskBackend(cpu, LRUCachePolicy(), str(tmp_path), 0.001, metadata=meta))
    assert [t.path for t in tiers] == [str(tmp_path / "rank0of2"), str(tmp_path / "rank1of2")]
    from lmcache.keys import CacheEngineKey
    from lmcache.memory.memory_format import MemoryFormat

    key = CacheEngineKey("m", 2, 0, 123, torch.float32)
    obj = allocator.allocate((2, 1, 4, 2), torch.float32, MemoryFormat.KV_2LTD)
    obj.tensor.copy_(torch.arange(16.0).view(2, 1, 4, 2))
    tiers[0].put(key, obj)
    obj.ref_count_down()
    tiers[0].flush(10)
    restarted = LocalDiskBackend(cpu, LRUCachePolicy(), str(tmp_path), 0.001,
                                 metadata=LMCacheMetadata("m", 2, 1, torch.float32, (1, 2, 4, 1, 2)))
    assert tiers[0].contains(key) and not tiers[1].contains(key) and not restarted.contains(key)
    assert len(os.listdir(tmp_path / "rank0of2")) == 1 and os.listdir(tmp_path / "rank1of2") == []
    restarted.close()
    for t in tiers:
        t.close()
    cpu.close()
    allocator.close()
