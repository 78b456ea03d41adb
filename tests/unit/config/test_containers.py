"""The dependency-injector containers: generic build, ordered tiers, overrides, shutdown."""

from __future__ import annotations

import pytest
import torch
from dependency_injector import providers

from lmcache.config import compose_config
from lmcache.containers import (
    SchedulerContainer,
    build,
    build_scheduler_container,
    build_tiers,
    build_worker_container,
    shutdown,
)
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.fifo import FIFOCachePolicy
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

META = LMCacheMetadata("org/model", 1, 0, torch.float32, (2, 2, 16, 2, 8))
LAYOUT = KVCacheLayout("cpu_packed", block_size=16, num_kv_heads=2, head_size=8)
LOCAL_CPU = {"_target_": "lmcache.storage.backends.local_cpu.LocalCPUBackend",
             "max_local_cpu_size": 0.01}


def never_built():
    raise AssertionError("a collaborator the constructor does not name was built")


def small_cfg(tmp_path, *overrides):
    return compose_config(["chunk_size=16", "max_local_cpu_size=0.01",
                           f"local_disk={tmp_path}", "max_local_disk_size=0.01", *overrides])


class CountingManager(StorageManager):
    """A real StorageManager that counts its close() calls."""

    closes = 0

    def close(self) -> None:
        type(self).closes += 1
        super().close()


def test_build_passes_only_named_collaborators_and_builds_them_lazily():
    node = {"_target_": "lmcache.token_database.chunked.ChunkedTokenDatabase", "chunk_size": 16}
    db = build(node, metadata=META, allocator=providers.Callable(never_built),
               layout=providers.Callable(never_built))
    assert isinstance(db, ChunkedTokenDatabase)
    assert build(None, metadata=META) is None
    policy = build({"_target_": "lmcache.storage.policy.fifo.FIFOCachePolicy"},
                   metadata=providers.Callable(never_built))
    assert isinstance(policy, FIFOCachePolicy)


def test_build_errors_name_the_option():
    with pytest.raises(ValueError, match="shared collaborator"):
        build({"_target_": "lmcache.token_database.chunked.ChunkedTokenDatabase",
               "metadata": "x"}, metadata=META)
    with pytest.raises(ValueError, match="_target_"):
        build({"chunk_size": 16})
    with pytest.raises(ValueError, match=r"unsupported keys \['_partial_'\]"):
        build({"_target_": "lmcache.storage.policy.lru.LRUCachePolicy", "_partial_": True})
    with pytest.raises(TypeError) as err:
        build({"_target_": "lmcache.storage.policy.lru.LRUCachePolicy", "size": 3})
    assert "lmcache.storage.policy.lru.LRUCachePolicy" in "".join(err.value.__notes__)


def test_build_tiers_keeps_order_and_gives_later_tiers_the_allocator_backend(tmp_path):
    allocator = CPUMemoryAllocator(1 << 20)
    disk = {"_target_": "lmcache.storage.backends.local_disk.LocalDiskBackend",
            "local_disk": str(tmp_path), "max_local_disk_size": 0.01}
    tiers = build_tiers({"local_cpu": LOCAL_CPU, "local_disk": disk}, allocator=allocator,
                        policy=providers.Factory(LRUCachePolicy), serde=providers.Callable(never_built))
    try:
        assert [type(t) for t in tiers] == [LocalCPUBackend, LocalDiskBackend]
        assert tiers[1].allocator_backend is tiers[0]
        assert tiers[0].allocator is allocator
    finally:
        for t in reversed(tiers):
            t.close()
        allocator.close()
    with pytest.raises(ValueError, match="storage/backends is empty"):
        build_tiers({})


def test_build_tiers_refuses_a_first_tier_that_cannot_allocate(tmp_path):
    """Called directly (no check_config), a tier ahead of local_cpu would get no allocator
    backend and fail at its first store; it is refused, and closed, at build instead."""
    allocator = CPUMemoryAllocator(1 << 20)
    disk = {"_target_": "lmcache.storage.backends.local_disk.LocalDiskBackend",
            "local_disk": str(tmp_path / "disk"), "max_local_disk_size": 0.01}
    try:
        with pytest.raises(ValueError) as err:
            build_tiers({"local_disk": disk, "local_cpu": LOCAL_CPU}, allocator=allocator,
                        policy=providers.Factory(LRUCachePolicy))
        assert str(err.value) == (
            "storage tier 'local_disk' (LocalDiskBackend) comes first in "
            "storage/backends=[local_disk,local_cpu] but cannot allocate: local_cpu must be the "
            "first tier (the allocator backend the other tiers stage through)")
    finally:
        allocator.close()


def test_worker_container_wires_one_allocator_and_a_policy_per_tier(tmp_path):
    container = build_worker_container(
        small_cfg(tmp_path, "storage/backends=[local_cpu,local_disk]", "storage/policy=fifo"),
        META, LAYOUT)
    try:
        engine = container.engine()
        cpu, disk = container.backends()
        manager = container.storage_manager()
        assert engine.storage_manager is manager and manager.backends == [cpu, disk]
        assert manager.allocator_backend is cpu and disk.allocator_backend is cpu
        assert cpu.allocator is container.allocator()
        assert isinstance(cpu.policy, FIFOCachePolicy) and cpu.policy is not disk.policy
        assert container.allocator().capacity_bytes >= int(0.01 * 1024**3) - 256
        assert container.token_database() is engine.token_database
        assert container.blender() is None
    finally:
        shutdown(container)


def test_providers_can_be_overridden(tmp_path):
    container = build_worker_container(small_cfg(tmp_path), META, LAYOUT)
    allocator = CPUMemoryAllocator(1 << 20)
    tier = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=0.001)
    CountingManager.closes = 0
    manager = CountingManager([tier])
    container.storage_manager.override(providers.Object(manager))
    try:
        engine = container.engine()
        assert engine.storage_manager is manager
        obj = engine.storage_manager.allocate((2, 2, 16, 16), torch.float32, MemoryFormat.KV_2LTD)
        assert obj is not None and allocator.num_active_allocations == 1
        obj.ref_count_down()
    finally:
        shutdown(container)
        shutdown(container)  # idempotent
    assert CountingManager.closes == 1  # the engine closed it; shutdown did not close it again
    allocator.close()


def test_shutdown_closes_once_in_owner_order(tmp_path):
    container = build_worker_container(small_cfg(tmp_path), META, LAYOUT)
    CountingManager.closes = 0
    container.storage_manager.override(providers.Factory(
        CountingManager, backends=container.backends, allocator_backend=container.allocator_backend))
    engine = container.engine()
    allocator = container.allocator()
    shutdown(container)
    assert CountingManager.closes == 1
    with pytest.raises(RuntimeError):
        engine.store(torch.arange(16))  # closed
    with pytest.raises(RuntimeError):
        allocator.allocate((16,), torch.uint8, MemoryFormat.BINARY)  # closed
    shutdown(container)
    assert CountingManager.closes == 1
    assert not container.allocator.initialized


def test_scheduler_container_builds_only_the_token_database(tmp_path):
    container = build_scheduler_container(small_cfg(tmp_path, "hash_algorithm=builtin"), META)
    assert container.declarative_parent is SchedulerContainer
    db = container.token_database()
    assert isinstance(db, ChunkedTokenDatabase) and db is container.token_database()
    for slot in ("allocator", "backends", "storage_manager", "engine", "gpu_connector"):
        assert not hasattr(container, slot)
    shutdown(container)


def test_checks_run_before_anything_is_built(tmp_path):
    with pytest.raises(ValueError, match="cannot hold one chunk"):
        build_worker_container(small_cfg(tmp_path, "max_local_cpu_size=0.000001"), META, LAYOUT)
    with pytest.raises(ValueError, match="differs from the chunk size"):
        build_scheduler_container(small_cfg(tmp_path, "chunk_size=32"), META)
