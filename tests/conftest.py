"""Shared test fixtures.

Every CPUMemoryAllocator created during a test must be empty (no live MemoryObj) when the test
ends: the autouse fixture ``_allocators_empty_after_test`` checks it with
:func:`assert_allocators_empty` (DESIGN.md §4.8). Tests may also call the ``assert_allocators_empty``
fixture themselves at any point.
"""

from __future__ import annotations

import gc
import sys
from typing import Iterable, Optional

import pytest

from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.policy.lru import LRUCachePolicy


def assert_allocators_empty(allocators: Optional[Iterable[CPUMemoryAllocator]] = None) -> None:
    """Assert that each allocator (default: every live one) has no active allocation and a
    consistent free list."""
    gc.collect()
    targets = CPUMemoryAllocator.live_instances() if allocators is None else list(allocators)
    problems = [
        repr(a) for a in targets if a.num_active_allocations != 0 or a.used_bytes != 0
        or not a.memcheck()
    ]
    assert not problems, "allocators not empty after test: " + "; ".join(problems)


@pytest.fixture(name="assert_allocators_empty")
def assert_allocators_empty_fixture():
    """The :func:`assert_allocators_empty` helper as a fixture."""
    return assert_allocators_empty


@pytest.fixture
def make_cpu_backend():
    """``make_cpu_backend(mib)`` -> an unpinned LRU LocalCPUBackend of ``mib`` MiB over its own
    CPUMemoryAllocator (the allocator_backend of tier and serde tests); every backend made is
    closed, then its allocator, when the test ends."""
    made = []

    def make(mib: int) -> LocalCPUBackend:
        allocator = CPUMemoryAllocator(mib << 20, pin_memory=False)
        backend = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=mib / 1024)
        made.append((backend, allocator))
        return backend

    yield make
    for backend, allocator in reversed(made):
        backend.close()
        allocator.close()


_frozen_at_modules = 0


def _freeze_imported_objects() -> None:
    """Move what imports created (torch and vLLM: ~600k objects) into the collector's permanent
    generation, so that each ``gc.collect()`` here walks only what tests create (~1 ms instead of
    ~1 s per call once vLLM is imported). Redone whenever a test imported more modules; frozen
    objects are still freed by reference counting."""
    global _frozen_at_modules
    if len(sys.modules) != _frozen_at_modules:
        gc.collect()
        gc.freeze()
        _frozen_at_modules = len(sys.modules)


def pytest_collection_finish(session):
    _freeze_imported_objects()


@pytest.fixture(autouse=True)
def _allocators_empty_after_test():
    _freeze_imported_objects()
    existing = CPUMemoryAllocator.live_instances()  # held, so their ids stay unique
    before = set(map(id, existing))
    yield
    gc.collect()
    created = [a for a in CPUMemoryAllocator.live_instances() if id(a) not in before]
    del existing
    assert_allocators_empty(created)
