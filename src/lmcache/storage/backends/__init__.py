"""Storage tiers (config group storage/backends); list order is tier order."""

from lmcache.storage.backends.base import StorageBackendInterface
from lmcache.storage.backends.local_cpu import LocalCPUBackend

__all__ = ["LocalCPUBackend", "StorageBackendInterface"]
