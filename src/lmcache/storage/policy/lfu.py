"""LFUCachePolicy: evict the least frequently used key first."""

from __future__ import annotations

from collections.abc import Hashable

from lmcache.storage.policy.base import CachePolicy


class LFUCachePolicy(CachePolicy):
    """Fewest uses first (a put counts 1, each hit adds 1); among equal counts, the key that
    reached its count earliest goes first. A re-put keeps the count."""

    def __init__(self) -> None:
        self._uses: dict[Hashable, tuple[int, int]] = {}  # key -> (count, tick of last change)
        self._tick = 0

    def _touch(self, key: Hashable, count: int) -> None:
        self._tick += 1
        self._uses[key] = (count, self._tick)

    def on_put(self, key: Hashable) -> None:
        if key not in self._uses:
            self._touch(key, 1)

    def on_hit(self, key: Hashable) -> None:
        if key in self._uses:
            self._touch(key, self._uses[key][0] + 1)

    def on_remove(self, key: Hashable) -> None:
        self._uses.pop(key, None)

    def _order(self) -> list[Hashable]:
        return sorted(self._uses, key=self._uses.__getitem__)
