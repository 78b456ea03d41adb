"""Shared fixtures of the storage-tier unit tests."""

import pytest

from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.policy.lru import LRUCachePolicy


@pytest.fixture
def cpu():
    """A 4 MiB unpinned LocalCPUBackend: the allocator_backend the slower tiers stage through."""
    allocator = CPUMemoryAllocator(4 << 20, pin_memory=False)
    backend = LocalCPUBackend(allocator, LRUCachePolicy(), max_local_cpu_size=4 / 1024)
    yield backend
    backend.close()
    allocator.close()
