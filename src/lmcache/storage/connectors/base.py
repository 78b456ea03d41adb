"""RemoteConnector: a remote key → (metadata, payload) store that fails into misses.

A connector moves opaque bytes; the layout of those bytes is defined in
:mod:`lmcache.serde.wire` and checked by the RemoteBackend. Each public
method here is fault-tolerant: a server that is down, slow, killed or restarted empty turns into
``False`` / ``None`` / a miss, never an exception, and costs at most one failed attempt every
``retry_interval_secs`` while it stays down (a simple circuit breaker). A connection that was
dropped while idle (server restart, ``CLIENT KILL``, a proxy's idle timeout) is not an outage:
the first transport error that is not a timeout drops the connector's connections
(``_on_transport_error``) and retries the call once on a fresh one; only when that fails too
is the remote marked down. Timeouts are never retried (a hung server would cost the deadline
twice). The first failure of an
outage logs one warning and recovery logs one line; ``stats`` counts both.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence, TypeVar, Union

from lmcache.serde.wire.remote_metadata import DEFAULT_MAX_PAYLOAD_BYTES

logger = logging.getLogger(__name__)

Buffer = Union[bytes, bytearray, memoryview]
T = TypeVar("T")


class RemoteConnector(ABC):
    """Base of every remote connector option (valkey, valkey_cluster, fs, lm, blackhole).

    Subclasses implement the ``_exists / _get / _put / _remove / _close`` hooks, which may raise
    anything; exceptions in ``transport_errors`` mark the remote as down (circuit open for
    ``retry_interval_secs``); any other exception costs only that call.

    Args:
        url: where the store is (scheme://...); meaning is connector specific.
        blocking_timeout_secs: upper bound, in seconds, on one network operation (socket
            timeouts are set to it); > 0.
        retry_interval_secs: while the remote is down, how long calls fail fast before the
            next real attempt (reconnection); >= 0.
        max_payload_bytes: the largest payload accepted from the remote, in bytes.

    Raises:
        ValueError: a non-positive timeout or size, or a negative retry interval.
    """

    name: str = "remote"
    transport_errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(
        self,
        url: str,
        blocking_timeout_secs: float = 10.0,
        retry_interval_secs: float = 1.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(f"remote url must look like scheme://..., got {url!r}")
        if not blocking_timeout_secs > 0:
            raise ValueError(f"blocking_timeout_secs must be > 0, got {blocking_timeout_secs!r}")
        if not retry_interval_secs >= 0:
            raise ValueError(f"retry_interval_secs must be >= 0, got {retry_interval_secs!r}")
        if not int(max_payload_bytes) > 0:
            raise ValueError(f"max_payload_bytes must be > 0, got {max_payload_bytes!r}")
        self.url = url
        self.blocking_timeout_secs = float(blocking_timeout_secs)
        self.retry_interval_secs = float(retry_interval_secs)
        self.max_payload_bytes = int(max_payload_bytes)
        self._lock = threading.Lock()
        self._down_until: Optional[float] = None
        self._closed = False
        self._logged_errors: set[type] = set()
        self.stats = {"failures": 0, "outages": 0, "recoveries": 0, "skipped_while_down": 0,
                      "reconnects": 0}

    # ---- fault-tolerant public API ---------------------------------------------------------
    def exists(self, key: str) -> bool:
        """True when the store holds ``key`` (a miss on any failure)."""
        return bool(self._guard("exists", lambda: self._exists(key), False))

    def batched_exists(self, keys: Sequence[str]) -> list[bool]:
        """One bool per key (all False on failure)."""
        keys = list(keys)
        if not keys:
            return []
        result = self._guard("batched_exists", lambda: self._batched_exists(keys), None)
        return [bool(x) for x in result] if result is not None else [False] * len(keys)

    def get(self, key: str) -> Optional[tuple[bytes, Buffer]]:
        """Raw ``(metadata, payload)`` of ``key``, unverified; None on miss or failure."""
        return self._guard("get", lambda: self._get(key), None)

    def put(self, key: str, metadata: bytes, payload: Buffer) -> bool:
        """Store ``payload`` then ``metadata`` under ``key``; False on failure."""
        return bool(self._guard("put", lambda: self._put(key, metadata, payload) or True, False))

    def remove(self, key: str) -> bool:
        """Delete ``key``; True when something was deleted."""
        return bool(self._guard("remove", lambda: self._remove(key), False))

    def close(self) -> None:
        """Release clients and sockets; later calls are misses. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._close()
        except Exception as e:  # closing a dead link must not raise either
            logger.debug("%s close: %r", self.name, e)

    @property
    def is_available(self) -> bool:
        """False while the circuit is open (the last attempt failed) or after close()."""
        return not self._closed and self._down_until is None

    # ---- hooks --------------------------------------------------------------------------
    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    def _batched_exists(self, keys: list[str]) -> list[bool]:
        return [self._exists(k) for k in keys]

    @abstractmethod
    def _get(self, key: str) -> Optional[tuple[bytes, Buffer]]: ...

    @abstractmethod
    def _put(self, key: str, metadata: bytes, payload: Buffer) -> None: ...

    @abstractmethod
    def _remove(self, key: str) -> bool: ...

    def _close(self) -> None:
        return None

    # ---- circuit breaker ----------------------------------------------------------------
    def _guard(self, op: str, fn: Callable[[], T], default: T) -> T:
        if self._closed:
            return default
        down_until = self._down_until
        if down_until is not None and time.monotonic() < down_until:
            self.stats["skipped_while_down"] += 1
            return default
        try:
            try:
                result = fn()
            except self.transport_errors as e:
                if _is_timeout(e):
                    raise
                self.stats["reconnects"] += 1
                self._on_transport_error()
                result = fn()  # once, on a fresh connection
        except self.transport_errors as e:
            self._mark_down(op, e)
            return default
        except Exception as e:  # one bad call costs a miss, never a crash of the caller
            self.stats["failures"] += 1
            if type(e) not in self._logged_errors:
                self._logged_errors.add(type(e))
                logger.warning("%s %s failed (%s: %s); treated as a miss", self.name, op,
                               type(e).__name__, e, exc_info=True)
            return default
        if self._down_until is not None:
            with self._lock:
                if self._down_until is not None:
                    self._down_until = None
                    self.stats["recoveries"] += 1
                    logger.warning("%s at %s is reachable again", self.name, self._safe_url())
        return result

    def _mark_down(self, op: str, error: BaseException) -> None:
        with self._lock:
            self.stats["failures"] += 1
            first = self._down_until is None
            self._down_until = time.monotonic() + self.retry_interval_secs
            if first:
                self.stats["outages"] += 1
        if first:
            logger.warning(
                "%s at %s is unavailable (%s during %s: %s); remote hits are lost until it is "
                "back (retrying every %.1fs)", self.name, self._safe_url(),
                type(error).__name__, op, error, self.retry_interval_secs,
            )
        self._on_transport_error()

    def _on_transport_error(self) -> None:
        """Hook: drop every pooled connection so that the next attempt connects afresh."""
        return None

    def _safe_url(self) -> str:
        """The url without credentials (for logs)."""
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"


def _is_timeout(error: BaseException) -> bool:
    """True for timeouts (socket, builtin, or a client library's ``TimeoutError`` class)."""
    return any(c.__name__ == "TimeoutError" for c in type(error).__mro__)
