"""ValueStore: the lm server's in-memory LRU of entries and its in-flight byte budget."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy


@dataclass(frozen=True)
class Entry:
    """One stored value with the fields LMCache's GET reply hands back.

    Attributes:
        fmt: MemoryFormat value as sent by the writer.
        dtype: wire dtype code as sent by the writer.
        shape: 4 shape slots as sent by the writer.
        extra: lmcache's extra bytes (its checksum); empty for an LMCache writer.
        data: the value bytes, a 1-D uint8 array (never mutated after the entry is built).
    """

    fmt: int
    dtype: int
    shape: tuple[int, int, int, int]
    extra: bytes
    data: numpy.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes this entry counts against the store's size."""
        return int(self.data.nbytes) + len(self.extra)


class ValueStore:
    """Key → Entry, least recently used first out, plus the budget of bytes being received.

    Args:
        max_size_bytes: total bytes of stored entries; > 0.
        max_inflight_bytes: total bytes of PUT values being received at once; > 0.

    Raises:
        ValueError: a non-positive limit.
    """

    def __init__(self, max_size_bytes: int, max_inflight_bytes: int) -> None:
        if max_size_bytes <= 0 or max_inflight_bytes <= 0:
            raise ValueError(f"max_size_bytes and max_inflight_bytes must be > 0, got "
                             f"{max_size_bytes} and {max_inflight_bytes}")
        self.max_size_bytes = int(max_size_bytes)
        self.max_inflight_bytes = int(max_inflight_bytes)
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._budget = threading.Condition(threading.Lock())
        self.used_bytes = 0
        self.inflight_bytes = 0
        self.evictions = 0

    # ---- entries ------------------------------------------------------------------------
    def put(self, key: bytes, entry: Entry) -> bool:
        """Store ``entry`` (evicting least recently used ones); False when it can never fit."""
        if entry.nbytes > self.max_size_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used_bytes -= old.nbytes
            while self._entries and self.used_bytes + entry.nbytes > self.max_size_bytes:
                _, victim = self._entries.popitem(last=False)
                self.used_bytes -= victim.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self.used_bytes += entry.nbytes
        return True

    def get(self, key: bytes) -> Optional[Entry]:
        """The entry of ``key`` (now most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def contains(self, key: bytes) -> bool:
        """Whether ``key`` is stored (does not refresh it)."""
        with self._lock:
            return key in self._entries

    def remove(self, key: bytes) -> bool:
        """Delete ``key``; True when it was stored."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self.used_bytes -= entry.nbytes
            return True

    def __len__(self) -> int:
        return len(self._entries)

    # ---- in-flight budget ---------------------------------------------------------------
    def reserve(self, nbytes: int, timeout: float) -> bool:
        """Reserve ``nbytes`` of the in-flight budget, waiting up to ``timeout`` seconds.

        False when the budget did not free up in time (or ``nbytes`` exceeds it entirely).
        Every True must be matched by one :meth:`release` of the same ``nbytes``.
        """
        if nbytes > self.max_inflight_bytes:
            return False
        deadline = time.monotonic() + timeout
        with self._budget:
            while self.inflight_bytes + nbytes > self.max_inflight_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._budget.wait(left)
            self.inflight_bytes += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` reserved with :meth:`reserve`."""
        with self._budget:
            self.inflight_bytes -= nbytes
            self._budget.notify_all()
