"""EventManager: futures of asynchronous events (e.g. LOADING), keyed by an event id.

A scheduler-side lookup can start loading the chunks it found in slower tiers (a prefetch,
keyed by the request's ``lookup_id``); the retrieve of that request later takes the event and
waits **only for the chunks it needs**, chunk by chunk, instead of for the whole prefetch.
Chunks it does not take are released when they arrive, so nothing leaks.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from enum import Enum
from typing import Callable, Hashable, Optional, Sequence


class EventType(Enum):
    """Kinds of asynchronous events."""

    LOADING = "loading"


class EventStatus(Enum):
    """State of an event: its futures still running, all done, or no such event."""

    ONGOING = "ongoing"
    DONE = "done"
    NOT_FOUND = "not_found"


def _release_later(future: Future, release: Callable[[object], None]) -> None:
    def _cb(f: Future) -> None:
        if f.cancelled() or f.exception() is not None:
            return
        result = f.result()
        if result is not None:
            release(result)

    future.add_done_callback(_cb)


class EventManager:
    """Thread-safe registry ``(EventType, event_id) -> list of per-item futures``.

    Args:
        release: called with each completed result that nobody takes (default: its
            ``ref_count_down()``, i.e. the results are MemoryObjs owned by the event).
    """

    def __init__(self, release: Optional[Callable[[object], None]] = None) -> None:
        self._release = release or (lambda obj: obj.ref_count_down())  # type: ignore[attr-defined]
        self._events: dict[tuple[EventType, Hashable], list[Future]] = {}
        self._lock = threading.Lock()

    def add_event(self, event_type: EventType, event_id: Hashable,
                  futures: Sequence[Future]) -> None:
        """Register the futures of one event (item i = chunk i of the request).

        Raises:
            TypeError: event_type is not an EventType.
            ValueError: an event with this type and id is already registered.
        """
        if not isinstance(event_type, EventType):
            raise TypeError(f"event_type must be an EventType, got {event_type!r}")
        with self._lock:
            if (event_type, event_id) in self._events:
                raise ValueError(f"{event_type.name} event {event_id!r} already registered")
            self._events[(event_type, event_id)] = list(futures)

    def get_event_status(self, event_type: EventType, event_id: Hashable) -> EventStatus:
        """ONGOING while any future is running, DONE when all finished, else NOT_FOUND."""
        with self._lock:
            futures = self._events.get((event_type, event_id))
        if futures is None:
            return EventStatus.NOT_FOUND
        return EventStatus.DONE if all(f.done() for f in futures) else EventStatus.ONGOING

    def __len__(self) -> int:
        return len(self._events)

    def take(self, event_type: EventType, event_id: Hashable, num_items: int,
             timeout: Optional[float] = None) -> Optional[list[Optional[object]]]:
        """Remove the event; wait for (only) its first ``num_items`` futures.

        Waiting stops at the first item that failed, was cancelled, returned None or missed the
        ``timeout`` (seconds, for the whole call; None = no limit): that item and all after it
        are None in the returned list, which always has ``min(num_items, len(futures))``
        entries. The caller owns every non-None result. Results not returned (items past
        ``num_items``, items after a gap, late ones) are released when they complete.

        Returns:
            None when no such event is registered.

        Raises:
            ValueError: num_items < 0.
        """
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        with self._lock:
            futures = self._events.pop((event_type, event_id), None)
        if futures is None:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[Optional[object]] = []
        gap = False
        for i, future in enumerate(futures):
            if i >= num_items or gap:
                _release_later(future, self._release)
                if i < num_items:
                    results.append(None)
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                result = future.result(timeout=remaining)
            except (FutureTimeout, CancelledError, Exception):
                result = None
                _release_later(future, self._release)
            gap = result is None
            results.append(result)
        return results

    def discard(self, event_type: EventType, event_id: Hashable) -> bool:
        """Drop the event and release each of its results when it arrives; False if absent."""
        with self._lock:
            futures = self._events.pop((event_type, event_id), None)
        for future in futures or ():
            _release_later(future, self._release)
        return futures is not None

    def close(self) -> None:
        """Discard every event."""
        with self._lock:
            keys = list(self._events)
        for event_type, event_id in keys:
            self.discard(event_type, event_id)
