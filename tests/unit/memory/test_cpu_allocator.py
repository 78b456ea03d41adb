import threading

import pytest
import torch

from lmcache.memory import CPUMemoryAllocator, MemoryFormat, MemoryObj


def test_memory_format_values():
    assert [(m.name, int(m)) for m in MemoryFormat] == [
        ("UNDEFINED", 0), ("KV_2LTD", 1), ("KV_T2D", 2), ("KV_2TD", 3), ("BINARY", 4),
        ("BINARY_BUFFER", 5), ("KV_MLA_FMT", 6)]


def test_allocate_view_of_buffer_and_free():
    alloc = CPUMemoryAllocator(4096, alignment=256)
    obj = alloc.allocate((2, 3, 4, 5), torch.bfloat16, MemoryFormat.KV_2LTD)
    assert obj.tensor.shape == (2, 3, 4, 5) and obj.tensor.dtype == torch.bfloat16
    assert obj.fmt is MemoryFormat.KV_2LTD and obj.nbytes == 240
    assert obj.get_ref_count() == 1 and not obj.is_pinned and obj.can_evict
    assert alloc.used_bytes == 256 and alloc.num_active_allocations == 1
    assert alloc._buffer.untyped_storage().data_ptr() == obj.tensor.untyped_storage().data_ptr()
    data = torch.arange(120, dtype=torch.bfloat16).reshape(2, 3, 4, 5)
    obj.tensor.copy_(data)
    assert torch.equal(alloc._buffer[:240].view(torch.bfloat16).view(2, 3, 4, 5), data)
    assert bytes(obj.byte_array) == data.view(torch.uint8).flatten().numpy().tobytes()
    obj.ref_count_down()
    assert not obj.is_valid and alloc.used_bytes == 0 and alloc.num_active_allocations == 0
    with pytest.raises(RuntimeError, match="freed"):
        obj.tensor
    with pytest.raises(RuntimeError, match="below 0"):
        obj.ref_count_down()
    assert alloc.memcheck()


def test_byte_array_is_writable_view():
    alloc = CPUMemoryAllocator(1024)
    obj = alloc.allocate((4,), torch.int32, MemoryFormat.BINARY)
    obj.byte_array[:] = bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0])
    assert obj.tensor.tolist() == [1, 2, 3, 4]
    obj.ref_count_down()


def test_ref_and_pin_counts():
    alloc = CPUMemoryAllocator(1024)
    obj = alloc.allocate((8,), torch.float32)
    obj.ref_count_up()
    assert obj.get_ref_count() == 2 and not obj.can_evict
    obj.ref_count_down()
    obj.pin()
    obj.pin()
    assert obj.is_pinned and obj.get_pin_count() == 2 and not obj.can_evict
    assert obj.unpin() and obj.unpin()
    assert obj.unpin() is False and obj.get_pin_count() == 0 and obj.can_evict
    obj.ref_count_down()
    assert alloc.num_active_allocations == 0


def test_no_space_returns_none_and_fragmentation_coalescing():
    alloc = CPUMemoryAllocator(1024, alignment=256)
    objs = [alloc.allocate((256,), torch.uint8) for _ in range(4)]
    assert [o.offset for o in objs] == [0, 256, 512, 768]
    assert alloc.allocate((1,), torch.uint8) is None
    objs[0].ref_count_down()
    objs[2].ref_count_down()
    # 512 bytes free in two holes of 256: a 512-byte request does not fit (fragmentation)
    assert alloc.allocate((512,), torch.uint8) is None
    assert alloc._free_offsets == [0, 512] and alloc.memcheck()
    objs[1].ref_count_down()  # coalesces 0..768 into one block
    assert alloc._free_offsets == [0] and alloc._free_sizes == [768]
    big = alloc.allocate((700,), torch.uint8)
    assert big.offset == 0 and big.reserved_bytes == 768 and alloc.used_bytes == 1024
    big.ref_count_down()
    objs[3].ref_count_down()
    assert alloc._free_offsets == [0] and alloc._free_sizes == [1024] and alloc.memcheck()


def test_first_fit_picks_lowest_hole():
    alloc = CPUMemoryAllocator(2048, alignment=256)
    objs = [alloc.allocate((256,), torch.uint8) for _ in range(6)]
    objs[1].ref_count_down()
    objs[4].ref_count_down()
    again = alloc.allocate((100,), torch.uint8)
    assert again.offset == 256
    for o in [again, objs[0], objs[2], objs[3], objs[5]]:
        o.ref_count_down()


def test_merge_with_next_only():
    alloc = CPUMemoryAllocator(1024, alignment=256)
    a, b, c = (alloc.allocate((256,), torch.uint8) for _ in range(3))
    c.ref_count_down()  # merges with tail free block
    assert alloc._free_offsets == [512] and alloc._free_sizes == [512]
    a.ref_count_down()
    b.ref_count_down()
    assert alloc._free_offsets == [0] and alloc._free_sizes == [1024]


def test_batched_allocate_all_or_nothing():
    alloc = CPUMemoryAllocator(1024, alignment=256)
    objs = alloc.batched_allocate((2, 16), torch.float16, 3, MemoryFormat.KV_2TD)
    assert len(objs) == 3 and all(o.fmt is MemoryFormat.KV_2TD for o in objs)
    assert alloc.batched_allocate((2, 16), torch.float16, 2) is None
    assert alloc.num_active_allocations == 3 and alloc.memcheck()
    for o in objs:
        o.ref_count_down()
    assert alloc.batched_allocate((4,), torch.uint8, 0) == []


def test_objects_do_not_overlap():
    alloc = CPUMemoryAllocator(64 * 1024, alignment=64)
    objs = [alloc.allocate((i + 1, 3), torch.float32) for i in range(20)]
    for i, o in enumerate(objs):
        o.tensor.fill_(float(i))
    for i, o in enumerate(objs):
        assert torch.all(o.tensor == float(i)) and o.offset % 64 == 0
        o.ref_count_down()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bool, torch.int64, torch.float64])
def test_every_dtype_views(dtype):
    alloc = CPUMemoryAllocator(4096, alignment=16)
    a = alloc.allocate((3,), torch.uint8)
    b = alloc.allocate((2, 5), dtype)
    assert b.offset == 16 and b.tensor.dtype == dtype and b.tensor.shape == (2, 5)
    a.ref_count_down()
    b.ref_count_down()


def test_bad_arguments():
    with pytest.raises(ValueError, match="size_bytes"):
        CPUMemoryAllocator(0)
    with pytest.raises(ValueError, match="alignment"):
        CPUMemoryAllocator(1024, alignment=24)
    alloc = CPUMemoryAllocator(1024)
    with pytest.raises(ValueError, match="0 bytes"):
        alloc.allocate((0, 4), torch.float16)
    with pytest.raises(TypeError):
        alloc.allocate((4,), "float16")
    with pytest.raises(ValueError):
        alloc.batched_allocate((4,), torch.float16, -1)


def test_not_pinned_without_cuda():
    alloc = CPUMemoryAllocator(1024, pin_memory=True)
    assert alloc.pinned == torch.cuda.is_available()
    assert CPUMemoryAllocator(1024, pin_memory=False).pinned is False


def test_close():
    alloc = CPUMemoryAllocator(1024)
    obj = alloc.allocate((4,), torch.float32)
    alloc.close()
    with pytest.raises(RuntimeError, match="closed"):
        alloc.allocate((4,), torch.float32)
    obj.ref_count_down()  # harmless after close
    assert alloc.num_active_allocations == 0


def test_standalone_memory_obj():
    raw = torch.zeros(8, dtype=torch.uint8)
    obj = MemoryObj(raw, (2,), torch.float32, MemoryFormat.BINARY)
    obj.tensor[:] = torch.tensor([1.5, -2.0])
    assert raw.view(torch.float32).tolist() == [1.5, -2.0]
    obj.ref_count_down()
    with pytest.raises(ValueError, match="needs 12"):
        MemoryObj(raw, (3,), torch.float32)
    with pytest.raises(TypeError):
        MemoryObj(raw.view(torch.int8), (8,), torch.int8)


def test_thread_safety():
    alloc = CPUMemoryAllocator(256 * 64, alignment=64)
    errors = []

    def worker(seed):
        try:
            for i in range(300):
                o = alloc.allocate((seed + 1, 8), torch.uint8)
                if o is None:
                    continue
                o.tensor.fill_(seed)
                o.ref_count_up()
                o.ref_count_down()
                assert torch.all(o.tensor == seed)
                o.ref_count_down()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and alloc.memcheck() and alloc.used_bytes == 0


def test_assert_allocators_empty_detects_leak(assert_allocators_empty):
    alloc = CPUMemoryAllocator(1024)
    obj = alloc.allocate((4,), torch.float32)
    with pytest.raises(AssertionError, match="not empty"):
        assert_allocators_empty([alloc])
    obj.ref_count_down()
    assert_allocators_empty([alloc])


def test_objects_allocated_under_inference_mode_are_writable_outside_it():
    """vLLM builds lmcache under torch.inference_mode; tiers fill objects from other threads."""
    with torch.inference_mode():
        alloc = CPUMemoryAllocator(1 << 16)
        obj = alloc.allocate((2, 3, 4), torch.bfloat16, MemoryFormat.KV_2LTD)
    assert not obj.tensor.is_inference()
    obj.tensor.fill_(1.5)
    assert torch.equal(obj.tensor, torch.full((2, 3, 4), 1.5, dtype=torch.bfloat16))
    obj.ref_count_down()
    alloc.close()
