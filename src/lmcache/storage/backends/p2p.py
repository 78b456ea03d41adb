"""P2PBackend: a storage tier after the local ones that pulls chunks from other instances' CPU
tiers (LMCache's ``enable_p2p``; option ``storage/backends/p2p``).

On a local miss the StorageManager asks this tier: it asks the CacheController (``p2p_lookup``
on ``controller_reply_url``) which other instance's worker of the same rank holds the longest
prefix of the chunks in its CPU tier, says hello to that peer once (``peer_init_url``: the
peers' transfer channels exchange agent metadata), asks the peer to hold the chunks
(``acquire``: a lease on each object, answered with where it lies in the peer's registered
buffer and its shape/dtype/format), allocates local memory of the same layout, **reads** the
bytes through the one ``transfer_channel`` (NIXL), and releases the lease. The StorageManager
writes the chunks back into the CPU tier, whose admit events tell the controller.

Failures cost hits, never wrong KV or a hang: a controller that does not answer within
``lookup_timeout_secs`` (then skipped for ``retry_interval_secs``, doubled per failure in a row
up to 16x), a peer that does not answer
or dies mid-transfer (``TransferError`` within ``blocking_timeout_secs``), a chunk whose layout
is not this worker's (different model shape or dtype) — each is a miss, counted in ``stats``.
Local memory of a failed read is not reused until ``2 x blocking_timeout_secs`` later (a late
write of a stalled transfer cannot land in memory that holds other KV). The peer's leases last
longer than any read (``lease_secs`` > ``blocking_timeout_secs``); a read that finishes after its
lease could have expired is discarded too.

The tier stores nothing itself (``put`` is a no-op; peers pull from each other's CPU tiers).
Its serving side is :class:`~lmcache.storage.backends.p2p_server.P2PPeerServer`; its requests
(kept ZMQ sockets, cached controller answers, hellos) are
:class:`~lmcache.storage.backends.p2p_client.P2PClient`'s; the local memory of a pull
(allocated while the peer answers ``acquire``; quarantine) is
:class:`~lmcache.storage.backends.p2p_memory.PullMemory`'s. The lease release is sent in the
background, off the pull's critical path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

from lmcache.controller.protocol import tcp_url
from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.base import StorageBackendInterface
from lmcache.storage.backends.p2p_client import P2PClient
from lmcache.storage.backends.p2p_memory import PullMemory, free
from lmcache.storage.backends.p2p_server import P2PPeerServer

logger = logging.getLogger(__name__)


class P2PBackend(StorageBackendInterface):
    """Args:
        allocator_backend: the CPU tier (allocates the pulled chunks; served to peers).
        metadata: this worker (worker_id = rank; the KV layout pulled chunks must have).
        transfer_channel: the channel option (``transfer_channel=nixl``); its region 0 must be
            the allocator's buffer (the container registers it).
        lmcache_instance_id, controller_reply_url: as the LMCacheWorker's.
        p2p_host, p2p_init_ports, p2p_lookup_ports: this worker's serving address (one port
            per worker in each list; 0 = a free port).
        blocking_timeout_secs: deadline of one pull (peer request + transfer), > 0.
        lookup_timeout_secs: deadline of one controller lookup, > 0.
        retry_interval_secs: after a failed controller lookup, lookups are skipped this long.
        lookup_cache_secs: how long a controller answer is reused (a lookup and its retrieve).
        num_get_workers: threads of the background pulls (prefetch).

    Raises:
        ValueError: missing instance id / URL / host / ports, or the channel's region 0 is
            not the allocator's buffer.
    """

    def __init__(self, allocator_backend: Any, metadata: LMCacheMetadata, transfer_channel: Any,
                 lmcache_instance_id: Optional[str] = None,
                 controller_reply_url: Optional[str] = None, p2p_host: Optional[str] = None,
                 p2p_init_ports: Optional[Sequence[int]] = None,
                 p2p_lookup_ports: Optional[Sequence[int]] = None,
                 blocking_timeout_secs: float = 5.0, lookup_timeout_secs: float = 0.5,
                 retry_interval_secs: float = 1.0, lookup_cache_secs: float = 2.0,
                 num_get_workers: int = 2) -> None:
        self.name = "P2PBackend"
        if transfer_channel is None:
            raise ValueError("the p2p tier needs a transfer channel: transfer_channel=nixl")
        if not lmcache_instance_id or p2p_host is None:
            raise ValueError("the p2p tier needs lmcache_instance_id and p2p_host, got "
                             f"{lmcache_instance_id!r} and {p2p_host!r}")
        w = metadata.worker_id
        for key, ports in (("p2p_init_ports", p2p_init_ports),
                           ("p2p_lookup_ports", p2p_lookup_ports)):
            if not ports or len(ports) <= w:
                raise ValueError(f"{key} needs a port for worker {w} (one per worker), "
                                 f"got {ports!r}")
        buffer = allocator_backend.allocator.buffer
        if transfer_channel.regions[0].data_ptr() != buffer.data_ptr():
            raise ValueError("transfer_channel's region 0 is not the CPU allocator's buffer")
        self.cpu = allocator_backend
        self.metadata = metadata
        self.channel = transfer_channel
        self.instance_id = str(lmcache_instance_id)
        self.reply_url = tcp_url(controller_reply_url, "controller_reply_url")
        self.blocking_timeout_secs = float(blocking_timeout_secs)
        self.lookup_timeout = float(lookup_timeout_secs)
        self.retry_interval = float(retry_interval_secs)
        self.lookup_cache_secs = float(lookup_cache_secs)
        self.lease_secs = 3 * self.blocking_timeout_secs + 1.0
        self._base = buffer.data_ptr()
        self.server = P2PPeerServer(allocator_backend, transfer_channel, self.instance_id,
                                    p2p_host, int(p2p_init_ports[w]), int(p2p_lookup_ports[w]),
                                    self.lease_secs)
        self.peer_init_url = f"{p2p_host}:{self.server.init_port}"
        self._pool = ThreadPoolExecutor(max_workers=num_get_workers, thread_name_prefix="lmc-p2p")
        self._hello_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmc-p2p-hello")
        self._hello_lock = threading.Lock()
        self._hellos: set[str] = set()  # peers whose background hello is under way
        self.before_read: Optional[Callable[[], None]] = None
        """Called between a peer's acquire and the read (a test seam: fault tests stop the
        peer exactly there)."""
        self.stats = {"lookups": 0, "lookup_failures": 0, "hit_chunks": 0, "pulls": 0,
                      "pulled_chunks": 0, "pulled_bytes": 0, "pull_failures": 0,
                      "layout_mismatches": 0}
        self.memory = PullMemory(allocator_backend, metadata, self.stats)
        self.client = P2PClient(transfer_channel, self.instance_id, w, self.reply_url,
                                self.lookup_timeout, self.retry_interval, self.lookup_cache_secs,
                                self.blocking_timeout_secs, self.stats)

    def connect_peers(self, init_urls: Sequence[str]) -> int:
        """Say hello in the background to every peer of ``init_urls`` (``host:port``, from the
        controller's register / heartbeat replies) not met yet, so that the first pull from it
        does not pay the metadata exchange and connection set-up. Returns how many hellos were
        started; a peer that does not answer is tried again at its next mention."""
        started = 0
        for url in init_urls:
            url = str(url)
            with self._hello_lock:
                if url == self.peer_init_url or url in self._hellos or self.client.knows(url):
                    continue
                self._hellos.add(url)
            started += 1

            def hello(u: str = url) -> None:
                try:
                    self.client.peer(u)
                finally:
                    with self._hello_lock:
                        self._hellos.discard(u)

            self._hello_pool.submit(hello)
        return started

    # ---- reads --------------------------------------------------------------------------
    def batched_contains(self, keys: Sequence[CacheEngineKey], pin: bool = False) -> int:
        """Chunks of the prefix of ``keys`` another instance holds (the controller's answer;
        nothing is pinned: the peer holds chunks only while they are pulled)."""
        n, _ = self.client.lookup(list(keys))
        self.stats["hit_chunks"] += n
        return n

    def contains(self, key: CacheEngineKey, pin: bool = False) -> bool:
        return self.batched_contains([key], pin) == 1

    def batched_get_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        """Pull the prefix of ``keys`` a peer holds: objects (+1 ref for the caller) then None
        from the first chunk not pulled; every failure is a miss within the deadline."""
        keys = list(keys)
        out: list[Optional[MemoryObj]] = [None] * len(keys)
        if not keys:
            return out
        self.memory.purge()
        url = self.client.cached_peer(keys[0])
        if url is None:
            n, url = self.client.lookup(keys)
            if not n:
                return out
        objs = self._pull(url, keys)
        out[:len(objs)] = objs
        return out

    def _pull(self, init_url: str, keys: list[CacheEngineKey]) -> list[MemoryObj]:
        deadline = time.monotonic() + self.blocking_timeout_secs
        peer = self.client.peer(init_url)
        if peer is None:
            self.stats["pull_failures"] += 1
            return []
        agent, lookup_url = peer
        self.stats["pulls"] += 1
        pending = self.client.send(lookup_url, self.client.acquire_message(keys),
                                   max(0.001, deadline - time.monotonic()))
        guess = self.memory.guess(len(keys))  # while the peer answers
        reply = pending.result()
        if reply is None:
            free(guess)
            self.stats["pull_failures"] += 1
            self.client.forget_peer(init_url)
            return []
        acquired_at = time.monotonic()
        lease, chunks = int(reply.get("lease", 0)), list(reply.get("chunks", []))[:len(keys)]
        try:
            objs = self.memory.allocate(chunks, guess)
            if not objs:
                return []
            local = [(obj.tensor.data_ptr() - self._base, obj.nbytes) for obj in objs]
            remote = [(int(c[0]), int(c[1])) for c in chunks[:len(objs)]]
            try:
                if self.before_read is not None:
                    self.before_read()
                self.channel.read(agent, local, remote,
                                  timeout_s=max(0.001, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - TransferError, a peer gone: a miss
                logger.warning("P2P pull of %d chunks from %s failed: %s", len(objs), init_url, e)
                self.stats["pull_failures"] += 1
                self.memory.quarantine(objs, 2 * self.blocking_timeout_secs)
                self.client.forget_peer(init_url, drop_channel_peer=True)
                return []
            if time.monotonic() - acquired_at > self.lease_secs - 1.0:  # lease may have lapsed
                self.stats["pull_failures"] += 1
                free(objs)
                return []
            self.stats["pulled_chunks"] += len(objs)
            self.stats["pulled_bytes"] += sum(o.nbytes for o in objs)
            return objs
        finally:
            if lease:
                self._pool.submit(self.client.request, lookup_url,
                                  {"op": "release", "lease": lease}, self.blocking_timeout_secs)

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        return self.batched_get_blocking([key])[0]

    def batched_get_non_blocking(self, keys: Sequence[CacheEngineKey]) -> list[Future]:
        """One future per key, all pulled in the background (one pull for the batch)."""
        keys = list(keys)
        futures: list[Future] = [Future() for _ in keys]

        def run() -> None:
            try:
                objs = self.batched_get_blocking(keys)
            except Exception:  # noqa: BLE001 - a failed pull is a miss
                logger.exception("P2P background pull failed")
                objs = [None] * len(keys)
            for f, obj in zip(futures, objs):
                f.set_result(obj)

        self._pool.submit(run)
        return futures

    # ---- the tier stores nothing ------------------------------------------------------
    keeps_puts = False  # (a store's presence check does not ask the controller)

    def put(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        """No-op: peers pull from each other's CPU tiers."""

    def unpin(self, key: CacheEngineKey) -> bool:
        return False

    def remove(self, key: CacheEngineKey) -> bool:
        return False

    def clear(self) -> int:
        return 0

    def close(self) -> None:
        """Stop serving peers, release leases and quarantined memory (idempotent)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.server.close()
        self._hello_pool.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=False)
        self.memory.purge(everything=True)
        self.client.close()
