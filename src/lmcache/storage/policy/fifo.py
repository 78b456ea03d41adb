"""FIFOCachePolicy: evict the oldest stored key first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from lmcache.storage.policy.base import CachePolicy


class FIFOCachePolicy(CachePolicy):
    """First stored key is the first victim; hits and re-puts do not change the order."""

    def __init__(self) -> None:
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def on_put(self, key: Hashable) -> None:
        self._keys.setdefault(key, None)

    def on_hit(self, key: Hashable) -> None:
        pass

    def on_remove(self, key: Hashable) -> None:
        self._keys.pop(key, None)

    def _order(self) -> list[Hashable]:
        return list(self._keys)
