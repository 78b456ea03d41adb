"""Shared fixtures of the storage-tier unit tests."""

import pytest


@pytest.fixture
def cpu(make_cpu_backend):
    """A 4 MiB unpinned LocalCPUBackend: the allocator_backend the slower tiers stage through."""
    return make_cpu_backend(4)
