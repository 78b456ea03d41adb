"""CachePolicy: the eviction order of a tier's keys."""

from __future__ import annotations

import abc
from collections.abc import Hashable, Iterable, Iterator


class CachePolicy(abc.ABC):
    """Tracks puts, hits and removals of a tier's keys and yields eviction candidates in order.

    Not thread-safe on its own: the owning backend calls it under its lock.
    """

    @abc.abstractmethod
    def on_put(self, key: Hashable) -> None:
        """A key was stored (or stored again)."""

    @abc.abstractmethod
    def on_hit(self, key: Hashable) -> None:
        """A stored key was read."""

    @abc.abstractmethod
    def on_remove(self, key: Hashable) -> None:
        """A key left the tier (evicted or removed). Unknown keys are ignored."""

    @abc.abstractmethod
    def _order(self) -> list[Hashable]:
        """Every tracked key, first victim first."""

    def victims(self, candidates: Iterable[Hashable]) -> Iterator[Hashable]:
        """``candidates`` in eviction order (a snapshot: the caller may evict while iterating).

        Candidates the policy has never seen come last, in the given order.
        """
        wanted = dict.fromkeys(candidates)
        ordered = [k for k in self._order() if k in wanted]
        seen = set(ordered)
        ordered.extend(k for k in wanted if k not in seen)
        return iter(ordered)
