"""PDSender: the prefiller side of disaggregated prefill (PD).

``push(keys, objs)`` hands a store's chunks to the decoder before it returns: allocation request
(the decoder answers offsets in its buffer for all chunks, or none when its buffer is full) → one
transfer-channel write of every allocated chunk (its notification names the allocation) → commit
(the decoder answers once the chunks are visible to its lookups). While the decoder's buffer is
full the request is repeated every ``poll_interval_s`` until ``allocation_timeout_s``; then the
chunks are dropped (the decoder recomputes them). A decoder that is gone or restarted fails the
push (counted, logged), and the next push connects afresh. Nothing here raises into the store
path.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Sequence

import zmq

from lmcache.keys import dtype_to_name
from lmcache.storage.backends.pd_protocol import ReqClient, pack, tcp
from lmcache.transfer.base import TransferError

logger = logging.getLogger(__name__)


class PDSender:
    """Pushes chunks to one decoder (pd_peer_host, pd_peer_init_port, pd_peer_alloc_port)."""

    def __init__(self, channel: Any, host: str, init_port: int, alloc_port: int,
                 allocation_timeout_s: float = 5.0, request_timeout_s: float = 5.0,
                 poll_interval_s: float = 0.005):
        self.channel = channel
        self.base = channel.regions[0].data_ptr()
        self.allocation_timeout_s = allocation_timeout_s
        self.poll_interval_s = poll_interval_s
        ctx = zmq.Context.instance()
        self.init = ReqClient(ctx, tcp(host, init_port), request_timeout_s)
        self.alloc = ReqClient(ctx, tcp(host, alloc_port), request_timeout_s)
        self.peer: str | None = None
        self.stats = {"pushes": 0, "pushed_chunks": 0, "pushed_bytes": 0, "skipped_chunks": 0,
                      "dropped_chunks": 0, "failed_pushes": 0, "push_seconds": 0.0}
        self._warned = False

    def _connect(self) -> str:
        if self.peer is None:
            reply = self.init.call({"op": "hello", "md": self.channel.agent_metadata()})
            self.peer = self.channel.add_peer(reply.get("md"))
            logger.info("PD prefiller: connected to decoder %s", self.peer)
        return self.peer

    def _disconnect(self) -> None:
        if self.peer is not None:
            self.channel.remove_peer(self.peer)
        self.peer = None
        self.init.close()
        self.alloc.close()

    def push(self, keys: Sequence[Any], objs: Sequence[Any]) -> int:
        """Transfer ``objs`` (MemoryObjs of the allocator buffer) under ``keys``; returns chunks
        the decoder now holds (written or already there). Never raises."""
        if not keys:
            return 0
        t0 = time.perf_counter()
        todo = list(range(len(keys)))
        done = 0
        deadline = time.monotonic() + self.allocation_timeout_s
        try:
            peer = self._connect()
            while todo:
                rid = uuid.uuid4().hex
                reply = self.alloc.call({
                    "op": "alloc", "id": rid, "keys": [keys[i].to_string() for i in todo],
                    "shapes": [list(objs[i].shape) for i in todo],
                    "dtype": dtype_to_name(objs[todo[0]].dtype), "fmt": int(objs[todo[0]].fmt)})
                if reply.get("agent") != peer:  # the decoder restarted: its memory is new
                    raise ConnectionError(f"decoder {peer} was replaced by {reply.get('agent')}")
                offsets = reply.get("offsets")
                if not isinstance(offsets, list) or len(offsets) > len(todo):
                    raise ValueError(f"bad alloc reply offsets {offsets!r}")
                local, remote = [], []
                for i, off in zip(todo, offsets):
                    if off >= 0:
                        raw = objs[i].raw_data
                        n = raw.numel()
                        local.append((raw.data_ptr() - self.base, n))
                        remote.append((int(off), n))
                        self.stats["pushed_bytes"] += n
                    else:
                        self.stats["skipped_chunks"] += 1
                if local:
                    self.channel.write(peer, local, remote, notify=pack({"op": "done", "id": rid}))
                    self.alloc.call({"op": "commit", "id": rid})
                    self.stats["pushed_chunks"] += len(local)
                done += len(offsets)
                todo = todo[len(offsets):]
                if todo:
                    if time.monotonic() >= deadline:
                        self.stats["dropped_chunks"] += len(todo)
                        logger.warning("PD prefiller: decoder buffer full for %.1f s; %d chunks "
                                       "dropped (the decoder recomputes them)",
                                       self.allocation_timeout_s, len(todo))
                        break
                    time.sleep(self.poll_interval_s)
        except (TransferError, TimeoutError, ConnectionError, ValueError, zmq.ZMQError) as e:
            self.stats["failed_pushes"] += 1
            (logger.debug if self._warned else logger.warning)(
                "PD prefiller: push of %d chunks failed after %d: %s", len(keys), done, e)
            self._warned = True
            self._disconnect()
        self.stats["pushes"] += 1
        self.stats["push_seconds"] += time.perf_counter() - t0
        return done

    def close(self) -> None:
        self._disconnect()
