"""Eviction policies (config group storage/policy: lru, fifo, lfu, mru)."""

from lmcache.storage.policy.base import CachePolicy
from lmcache.storage.policy.fifo import FIFOCachePolicy
from lmcache.storage.policy.lfu import LFUCachePolicy
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.storage.policy.mru import MRUCachePolicy

__all__ = ["CachePolicy", "FIFOCachePolicy", "LFUCachePolicy", "LRUCachePolicy",
           "MRUCachePolicy"]
