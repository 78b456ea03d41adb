"""PDBackend: the storage tier of disaggregated prefill (PD, LMCache's ``enable_pd``).

The prefiller (``pd_role: sender``, vLLM ``kv_role: kv_producer``) keeps nothing: every chunk it
stores is pushed, before the store returns, into a buffer the decoder allocated for it (alloc
request → transfer-channel write → commit; :mod:`pd_sender`). The decoder (``pd_role: receiver``,
``kv_consumer``) holds the pushed chunks in its buffer (the allocator, ``pd_buffer_size`` bytes)
like a CPU tier, so its lookup and retrieve find them locally, with no store round trip
(:mod:`pd_receiver`); when the buffer is full the oldest unpinned chunks are evicted. Both sides
are allocator backends (this tier comes alone: ``storage/backends=[pd]``); the transfer channel's
region 0 is the allocator's buffer (``transfer_channel=nixl``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

from lmcache.keys import CacheEngineKey
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.pd_protocol import port_of
from lmcache.storage.policy.base import CachePolicy

logger = logging.getLogger(__name__)

GiB = 1 << 30
ROLES = ("sender", "receiver")


class PDBackend(LocalCPUBackend):
    """PD tier (name ``PDBackend``); see the module doc.

    Args:
        allocator, policy: as LocalCPUBackend (the allocator is the PD buffer).
        transfer_channel: the process's TransferChannel (region 0 = ``allocator.buffer``).
        metadata: LMCacheMetadata (worker_id picks the port of per-rank port lists).
        pd_role: "sender" (prefiller) or "receiver" (decoder).
        pd_peer_host, pd_peer_init_port, pd_peer_alloc_port: the decoder's address; the decoder
            binds there, the prefiller connects there (ints or one port per worker).
        pd_allocation_timeout_sec: how long the prefiller keeps asking a full decoder buffer.
        pd_request_timeout_sec: deadline of one control round trip (alloc, commit, hello).
        pd_pending_ttl_sec: decoder: an allocation never committed is released after this long.
        pd_condition_poll_interval_sec: prefiller: pause between allocation retries.
    Raises:
        ValueError: a bad role, missing ports, no transfer channel or a channel that does not
            register this allocator's buffer (each named).
    """

    def __init__(self, allocator: CPUMemoryAllocator, policy: CachePolicy, transfer_channel: Any,
                 metadata: LMCacheMetadata, pd_role: str, pd_peer_host: str = "127.0.0.1",
                 pd_peer_init_port: Any = None, pd_peer_alloc_port: Any = None,
                 pd_allocation_timeout_sec: float = 5.0, pd_request_timeout_sec: float = 5.0,
                 pd_pending_ttl_sec: float = 30.0, pd_condition_poll_interval_sec: float = 0.005):
        if pd_role not in ROLES:
            raise ValueError(f"pd_role must be one of {ROLES}, got {pd_role!r}")
        if transfer_channel is None:
            raise ValueError("the pd tier needs a transfer channel: transfer_channel=nixl")
        regions = transfer_channel.regions
        if not regions or regions[0].data_ptr() != allocator.buffer.data_ptr():
            raise ValueError("the transfer channel's region 0 must be the allocator's buffer")
        for name, value in (("pd_allocation_timeout_sec", pd_allocation_timeout_sec),
                            ("pd_request_timeout_sec", pd_request_timeout_sec),
                            ("pd_pending_ttl_sec", pd_pending_ttl_sec)):
            if isinstance(value, bool) or not 0 < float(value) < math.inf:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        init = port_of(pd_peer_init_port, metadata.worker_id, "pd_peer_init_port")
        alloc = port_of(pd_peer_alloc_port, metadata.worker_id, "pd_peer_alloc_port")
        if init is None or alloc is None:
            raise ValueError("pd_peer_init_port and pd_peer_alloc_port are required (the decoder's ports)")
        super().__init__(allocator, policy, max_local_cpu_size=allocator.capacity_bytes / GiB,
                         local_cpu=pd_role == "receiver")
        self.name = "PDBackend"
        self.pd_role = pd_role
        self.transfer_channel = transfer_channel
        self.sender = self.receiver = None
        if pd_role == "sender":
            from lmcache.storage.backends.pd_sender import PDSender

            self.sender = PDSender(transfer_channel, pd_peer_host, init, alloc,
                                   float(pd_allocation_timeout_sec), float(pd_request_timeout_sec),
                                   float(pd_condition_poll_interval_sec))
        else:
            from lmcache.storage.backends.pd_receiver import PDReceiver

            self.receiver = PDReceiver(self, transfer_channel, pd_peer_host, init, alloc,
                                       commit_timeout_s=float(pd_request_timeout_sec),
                                       pending_ttl_s=float(pd_pending_ttl_sec))
        logger.info("PDBackend %s: decoder at %s init %d alloc %d, buffer %.2f GiB", pd_role,
                    pd_peer_host, init, alloc, allocator.capacity_bytes / GiB)

    @property
    def stats(self) -> dict:
        """Counters of the sender (pushes, pushed_chunks, pushed_bytes, skipped_chunks,
        dropped_chunks, failed_pushes, push_seconds) or of the receiver (allocs, alloc_full,
        commits, stored_chunks, expired, commit_failures, bad_messages)."""
        return dict((self.sender or self.receiver).stats)

    def contains(self, key: CacheEngineKey, pin: bool = False) -> bool:
        """Receiver: held in the buffer; sender: always False (every store is pushed)."""
        return self.receiver is not None and super().contains(key, pin)

    def put(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        if self.sender is not None:
            self.sender.push([key], [obj])
        else:
            super().put(key, obj)

    def batched_put(self, keys: Sequence[CacheEngineKey], objs: Sequence[MemoryObj]) -> None:
        """Sender: push every chunk to the decoder before returning; receiver: keep them."""
        if len(keys) != len(objs):
            raise ValueError(f"batched_put got {len(keys)} keys but {len(objs)} objects")
        if self.sender is not None:
            self.sender.push(keys, objs)
        else:
            super().batched_put(keys, objs)

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        return super().get_blocking(key) if self.receiver is not None else None

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        if self.sender is not None:
            self.sender.close()
        super().close()
