"""RemoteBackend: the remote tier (L3) through a Serde and a RemoteConnector."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Sequence
from typing import Callable, Optional, TypeVar

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata
from lmcache.serde.base import Allocating, Serde
from lmcache.serde.wire.chunk_layout import ChunkLayout
from lmcache.serde.wire.metadata import encode_metadata
from lmcache.serde.wire.remote_metadata import dtype_to_code
from lmcache.storage.backends.base import StorageBackendInterface
from lmcache.storage.backends.circuit_breaker import CircuitBreaker
from lmcache.storage.backends.remote_reads import RemoteReads, release_when_done
from lmcache.storage.connectors.base import RemoteConnector

logger = logging.getLogger(__name__)
T = TypeVar("T")
PROBE_KEY = "lmcache-breaker-probe"  # looked up (never written) by the breaker's probe
__all__ = ["RemoteBackend", "release_when_done"]


class RemoteBackend(RemoteReads, StorageBackendInterface):
    """Chunks in a remote store (Valkey, Valkey Cluster, fs, lm, ...).

    * ``put`` never waits on the network: it takes the tier's own reference and queues the
      upload on ``num_put_workers`` threads (at most ``max_pending_puts`` queued; more are
      dropped and counted); the reference is dropped once sent. A queued chunk is served from
      memory.
    * Reads run on ``num_get_workers`` threads and every blocking call returns within
      ``blocking_timeout_secs`` seconds (``contains`` / ``batched_contains``, which lookups
      and the store path ask, within ``contains_timeout_secs``): a late answer is a miss (its
      memory is released when it arrives).
    * Circuit breaker: a call that misses its deadline, or an upload running longer than
      ``blocking_timeout_secs``, opens the breaker. While open every call fails fast without
      touching the network (contains → not held, get → miss, put → dropped and counted in
      ``dropped_open``, queued uploads are dropped too), so a hung remote never stalls a
      lookup or a store; a background probe (an ``exists`` every ``probe_interval_secs``
      that must answer within ``contains_timeout_secs``) closes it again. ``breaker.stats``
      counts opens, closes, rejected calls and probes. Remote bytes are verified with
      :mod:`lmcache.serde.wire` (sizes, header, checksum; a header whose length disagrees with
      the payload is a miss) before the Serde copies them into memory from
      ``allocator_backend``.
    * A prefetch (:meth:`batched_get_non_blocking`) reserves the memory of every read when it
      starts (a full chunk of the layout each, :class:`Reservation`) and returns futures only
      for the chunks it could reserve memory for, so a lookup promises only what its retrieve
      can deliver; "no memory" is counted in ``stats["no_memory"]``, apart from misses.
    * Any remote failure is a miss or a dropped put, never an exception (see RemoteConnector).
      Remote data cannot be pinned (``unpin`` returns False); ``clear`` drops queued puts but
      leaves the shared remote store as it is (other instances may use it).

    Args:
        allocator_backend: gives memory for the chunks read back.
        serde: turns MemoryObjs into payload bytes and back.
        remote_connector: the store.
        blocking_timeout_secs: deadline of one blocking call (get/remove), > 0.
        contains_timeout_secs: deadline of contains/batched_contains in seconds, > 0 and below
            ``lookup_timeout_ms``, so that the faster tiers' prefix is still promised when this
            tier hangs; None → a third of ``lookup_timeout_ms`` (1 s when that is None too).
        lookup_timeout_ms: the scheduler's deadline of one lookup (config key
            ``lookup_timeout_ms``), milliseconds, or None.
        probe_interval_secs: seconds between probes while the breaker is open, > 0.
        num_get_workers / num_put_workers: threads, >= 1.
        max_pending_puts: queued uploads at most, >= 1.
        metadata: this worker's LMCacheMetadata (injected): its KV layout is recorded with
            every chunk written and a chunk of another layout is a miss.

    Raises:
        TypeError: no RemoteConnector or Serde given.
        ValueError: non-positive timeout or counts; a ``metadata.kv_dtype`` the remote wire
            format has no code for.
    """

    def __init__(
        self,
        allocator_backend: Allocating,
        serde: Serde,
        remote_connector: RemoteConnector,
        blocking_timeout_secs: float = 10.0,
        num_get_workers: int = 8,
        num_put_workers: int = 2,
        max_pending_puts: int = 64,
        contains_timeout_secs: Optional[float] = None,
        probe_interval_secs: float = 1.0,
        lookup_timeout_ms: Optional[int] = None,
        metadata: Optional["LMCacheMetadata"] = None,
    ) -> None:
        if not isinstance(remote_connector, RemoteConnector):
            raise TypeError(f"remote_connector must be a RemoteConnector (select one, e.g. "
                            f"remote_connector=valkey), got {remote_connector!r}")
        if not isinstance(serde, Serde):
            raise TypeError(f"serde must be a Serde (e.g. serde=naive), got {serde!r}")
        if contains_timeout_secs is None:
            contains_timeout_secs = 1.0 if lookup_timeout_ms is None else lookup_timeout_ms / 3000
        elif lookup_timeout_ms is not None and contains_timeout_secs * 1000 >= lookup_timeout_ms:
            raise ValueError(
                f"contains_timeout_secs={contains_timeout_secs} of the remote tier must be below "
                f"lookup_timeout_ms={lookup_timeout_ms} ms, or a hung remote makes every lookup "
                f"a miss; lower it or leave it null (a third of lookup_timeout_ms)")
        for what, value in (("blocking_timeout_secs", blocking_timeout_secs),
                            ("contains_timeout_secs", contains_timeout_secs)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{what} must be > 0, got {value!r} (seconds)")
        if min(num_get_workers, num_put_workers, max_pending_puts) < 1:
            raise ValueError(
                f"num_get_workers, num_put_workers, max_pending_puts must be >= 1, got "
                f"{num_get_workers}, {num_put_workers}, {max_pending_puts}"
            )
        self.name = "RemoteBackend"
        self.allocator_backend = allocator_backend
        self.serde = serde
        self.connector = remote_connector
        self.blocking_timeout_secs = float(blocking_timeout_secs)
        self.contains_timeout_secs = float(contains_timeout_secs)
        self.breaker = CircuitBreaker(f"remote tier {getattr(remote_connector, 'url', '')}",
                                      self._probe, probe_interval_secs)
        self._uploading: dict[int, float] = {}  # thread id -> start of its current upload
        self.max_pending_puts = max_pending_puts
        self.layout = ChunkLayout.from_metadata(metadata) if metadata is not None else None
        if metadata is not None:
            try:  # checked at start: a dtype the wire cannot carry would drop every upload
                dtype_to_code(metadata.kv_dtype)
            except ValueError as e:
                raise ValueError(f"the remote tier cannot hold KV of dtype {metadata.kv_dtype} "
                                 f"(LMCacheMetadata.kv_dtype): {e}") from e
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: dict[CacheEngineKey, MemoryObj] = {}
        self._closed = False
        self._warned: set[str] = set()
        self.stats = dict.fromkeys(
            ("puts", "put_failures", "dropped_backlog", "hits", "misses", "corrupt",
             "timeouts", "dropped_open", "no_memory"), 0)
        self._largest_chunk = 0  # bytes of the largest chunk put or read (no layout: reserve)
        self._getters = ThreadPoolExecutor(num_get_workers, thread_name_prefix="lmc-remote-r")
        self._putters = ThreadPoolExecutor(num_put_workers, thread_name_prefix="lmc-remote-w")

    # ---- helpers -------------------------------------------------------------------------
    def _wait(self, future: "Future[T]", default: T, deadline: Optional[float] = None) -> T:
        """Result of ``future`` by ``deadline`` (default now + blocking_timeout_secs); a
        missed deadline is ``default`` and opens the breaker."""
        if deadline is None:
            deadline = time.monotonic() + self.blocking_timeout_secs
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            self.stats["timeouts"] += 1
            self.breaker.trip("a remote call missed its deadline")
            return default
        except (CancelledError, Exception) as e:  # never raise into the engine
            self._warn_once(f"error:{type(e).__name__}", "remote call failed: %r", e)
            return default

    def _run(self, fn: Callable[[], T], default: T, timeout: Optional[float] = None) -> T:
        if self._closed or self.breaker.reject():
            return default
        deadline = time.monotonic() + (self.blocking_timeout_secs if timeout is None else timeout)
        try:
            return self._wait(self._getters.submit(fn), default, deadline)
        except RuntimeError:  # pool shut down by a concurrent close()
            return default

    def _probe(self) -> bool:
        """The breaker's probe: one ``exists`` answered within ``contains_timeout_secs``."""
        started = time.monotonic()
        self.connector.exists(PROBE_KEY)
        in_time = time.monotonic() - started <= self.contains_timeout_secs
        return in_time and bool(getattr(self.connector, "is_available", True))

    def _check_uploads(self) -> None:
        """Open the breaker when an upload has run past ``blocking_timeout_secs``."""
        started = min(tuple(self._uploading.values()), default=None)
        if started is not None and time.monotonic() - started > self.blocking_timeout_secs:
            self.breaker.trip("a remote upload is stuck")

    # ---- queries -------------------------------------------------------------------------
    def contains(self, key: CacheEngineKey, pin: bool = False) -> bool:
        """True when queued or in the remote store (``pin`` has no effect on a remote)."""
        if key in self._pending:
            return True
        return self._run(lambda: self.connector.exists(key.to_string()), False,
                         self.contains_timeout_secs)

    def batched_contains(self, keys: Sequence[CacheEngineKey], pin: bool = False) -> int:
        """Contiguous prefix of ``keys`` held (queued or remote); one batched remote query."""
        keys = list(keys)
        n = 0
        while n < len(keys) and keys[n] in self._pending:
            n += 1
        rest = [k.to_string() for k in keys[n:]]
        if not rest:
            return n
        flags = self._run(lambda: self.connector.batched_exists(rest), [],
                          self.contains_timeout_secs)
        for flag in flags:
            if not flag:
                break
            n += 1
        return n

    def unpin(self, key: CacheEngineKey) -> bool:
        """Remote chunks are never pinned: always False."""
        return False

    # ---- writes --------------------------------------------------------------------------
    def put(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        """Queue an upload of ``obj`` (dropped when the queue is full or the tier closed)."""
        self._check_uploads()
        if self.breaker.reject():
            self.stats["dropped_open"] += 1
            return
        with self._lock:
            if self._closed or key in self._pending:
                return
            if len(self._pending) >= self.max_pending_puts:
                self.stats["dropped_backlog"] += 1
                self._warn_once("backlog", "remote uploads backlogged (%d queued); dropping "
                                "new chunks from the remote tier", len(self._pending))
                return
            obj.ref_count_up()
            self._pending[key] = obj
            self._largest_chunk = max(self._largest_chunk, obj.nbytes)
        self._putters.submit(self._upload, key, obj)

    def _upload(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        try:
            with self._lock:
                if self._pending.get(key) is not obj:
                    return  # cleared before it was sent
            if self.breaker.reject():
                self.stats["dropped_open"] += 1
                return
            meta, payload = self.serde.serialize(obj)
            metadata = encode_metadata(meta, payload, key.to_string(), self.layout)
            me = threading.get_ident()
            self._uploading[me] = started = time.monotonic()
            try:
                ok = self.connector.put(key.to_string(), metadata, payload)
            finally:
                del self._uploading[me]
            if time.monotonic() - started > self.blocking_timeout_secs:
                self.breaker.trip("a remote upload missed its deadline")
            self.stats["puts" if ok else "put_failures"] += 1
        except ValueError as e:
            self.stats["put_failures"] += 1
            self._warn_once("serialize", "chunk %s cannot go to the remote tier: %s", key, e)
        finally:
            with self._lock:
                if self._pending.get(key) is obj:
                    del self._pending[key]
                    self._idle.notify_all()
            obj.ref_count_down()

    def remove(self, key: CacheEngineKey) -> bool:
        """Delete ``key`` from the remote store (and the upload queue)."""
        with self._lock:
            queued = self._pending.pop(key, None) is not None
            self._idle.notify_all()
        removed = self._run(lambda: self.connector.remove(key.to_string()), False)
        return queued or removed

    def clear(self) -> int:
        """Drop queued uploads (returns how many); the remote store itself is left as is."""
        with self._lock:
            n = len(self._pending)
            self._pending.clear()
            self._idle.notify_all()
        return n

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every queued upload was sent (or failed); False on ``timeout`` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def close(self) -> None:
        """Finish queued uploads (each bounded by the connector's timeouts), stop the
        threads and close the connector. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.breaker.shutdown()
        self._putters.shutdown(wait=True)
        self._getters.shutdown(wait=True, cancel_futures=True)
        self.connector.close()

    def _warn_once(self, what: str, msg: str, *args: object) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(msg, *args)
