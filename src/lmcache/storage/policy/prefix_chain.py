"""PrefixChain: which stored chunk continues which, so eviction goes from the tail of a prefix.

A chunk's key is a chained prefix hash: chunk i is reachable only through chunks 0..i-1. A tier
that evicts chunk 2 of a stored 8-chunk prompt makes chunks 3..7 unreachable (a lookup stops at
the first miss) while they still take space. The rule kept here: **a chunk is never evicted
while a later chunk of its prefix stays in the tier** — only *leaves* (chunks with no stored
continuation) are eviction candidates, in the CachePolicy's order; evicting a leaf may make its
parent a leaf, which is then a candidate at its own place in the policy's order. A hit on a
chunk therefore keeps its whole prefix: the prefix cannot go before it.

Links come from the stores (``StorageBackendInterface.link_prefix``, called before the put:
consecutive keys of one store, and the chunk before the first); a chunk without a known parent
is a root. Not
thread-safe on its own: the owning tier calls it under its lock.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from typing import Callable, Optional


class PrefixChain:
    """Parent links between a tier's present chunks, and leaf-first eviction order."""

    MAX_UPCOMING = 4096  # announced links of chunks not yet stored, kept at most

    def __init__(self) -> None:
        self._parent: dict[Hashable, Hashable] = {}  # present child -> its parent
        self._children: dict[Hashable, int] = {}  # key -> number of present children
        self._upcoming: OrderedDict[Hashable, Hashable] = OrderedDict()

    def __len__(self) -> int:
        """Number of links."""
        return len(self._parent)

    def link(self, keys: Sequence[Hashable], parent: Optional[Hashable],
             present: Callable[[Hashable], bool]) -> None:
        """Record that ``keys`` are consecutive chunks following ``parent`` (None: unknown or
        the first chunk). Keys already present (``present(key)``) are linked now; the others
        when the tier stores them (:meth:`inserted`; the last MAX_UPCOMING are remembered)."""
        for i, key in enumerate(keys):
            before = parent if i == 0 else keys[i - 1]
            if before is None or before == key:
                continue
            if present(key):
                self._set(key, before)
            else:
                self._upcoming[key] = before
                self._upcoming.move_to_end(key)
                if len(self._upcoming) > self.MAX_UPCOMING:
                    self._upcoming.popitem(last=False)

    def inserted(self, key: Hashable) -> None:
        """``key`` is being stored: link it if :meth:`link` announced its parent. Call it
        before making room for it, so its parent is no eviction candidate meanwhile (and
        :meth:`remove` it if it is not stored after all)."""
        before = self._upcoming.pop(key, None)
        if before is not None:
            self._set(key, before)

    def _set(self, key: Hashable, before: Hashable) -> None:
        old = self._parent.get(key)
        if old == before:
            return
        if old is not None:
            self._drop_child(old)
        self._parent[key] = before
        self._children[before] = self._children.get(before, 0) + 1

    def remove(self, key: Hashable) -> None:
        """``key`` left the tier: its link to its parent goes (its children keep theirs)."""
        parent = self._parent.pop(key, None)
        if parent is not None:
            self._drop_child(parent)

    def clear(self) -> None:
        self._parent.clear()
        self._children.clear()
        self._upcoming.clear()

    def links(self) -> list[tuple[Hashable, Hashable]]:
        """Every (child, parent) link of present chunks (a snapshot)."""
        return list(self._parent.items())

    def parent(self, key: Hashable) -> Optional[Hashable]:
        """The linked parent of ``key``, or None."""
        return self._parent.get(key)

    def is_leaf(self, key: Hashable) -> bool:
        """True when no present chunk continues ``key``."""
        return not self._children.get(key)

    def victims(self, order: Sequence[Hashable]) -> Iterator[Hashable]:
        """The leaves of ``order`` (a policy's eviction order), first victim first.

        Lazy: after each yielded key the caller may evict it (calling :meth:`remove`); a parent
        that thereby becomes a leaf is yielded next if the policy ranks it before the rest.
        """
        rank = {key: i for i, key in enumerate(order)}
        waiting: set[Hashable] = set()  # skipped because they had children
        ready: list[int] = []  # ranks of waiting keys that became leaves
        i = 0
        while True:
            if ready and (i >= len(order) or ready[0] < i):
                key = order[heapq.heappop(ready)]
            elif i < len(order):
                key = order[i]
                i += 1
            else:
                return
            if not self.is_leaf(key):
                waiting.add(key)
                continue
            parent = self._parent.get(key)
            yield key
            if parent in waiting and self.is_leaf(parent) and parent in rank:
                waiting.discard(parent)
                heapq.heappush(ready, rank[parent])

    def _drop_child(self, parent: Hashable) -> None:
        n = self._children.get(parent, 0) - 1
        if n > 0:
            self._children[parent] = n
        else:
            self._children.pop(parent, None)
