"""LRUCachePolicy: evict the least recently used key first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from lmcache.storage.policy.base import CachePolicy


class LRUCachePolicy(CachePolicy):
    """Least recently put-or-hit key is the first victim."""

    def __init__(self) -> None:
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def on_put(self, key: Hashable) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)

    def on_hit(self, key: Hashable) -> None:
        if key in self._keys:
            self._keys.move_to_end(key)

    def on_remove(self, key: Hashable) -> None:
        self._keys.pop(key, None)

    def _order(self) -> list[Hashable]:
        return list(self._keys)
