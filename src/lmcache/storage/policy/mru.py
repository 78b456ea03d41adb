"""MRUCachePolicy: evict the most recently used key first."""

from __future__ import annotations

from collections.abc import Hashable

from lmcache.storage.policy.lru import LRUCachePolicy


class MRUCachePolicy(LRUCachePolicy):
    """Most recently put-or-hit key is the first victim (recency order reversed)."""

    def _order(self) -> list[Hashable]:
        return list(reversed(self._keys))
