"""PDReceiver: the decoder side of disaggregated prefill (PD).

One thread serves the init port (channel metadata exchange) and the alloc port (allocation
requests and commits, pd_protocol), and polls the transfer channel's notifications. Allocated
objects are pending (invisible to lookups) until their commit arrives after the NIXL write's
notification; then they are put into the PD tier. Pending allocations whose commit never comes
(a prefiller that died mid-transfer) are released after ``pending_ttl_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
import zmq

from lmcache.keys import CacheEngineKey, name_to_dtype
from lmcache.memory.memory_format import MemoryFormat
from lmcache.storage.backends.pd_protocol import pack, tcp, unpack
from lmcache.transfer.base import TransferError

logger = logging.getLogger(__name__)


class PDReceiver:
    """Serves prefillers for ``backend`` (a PDBackend in the receiver role).

    Args:
        backend: allocates (``allocate``), holds (``put``/``contains``/``link_prefix``) chunks.
        channel: the transfer channel whose region 0 is the allocator's buffer.
        host, init_port, alloc_port: where to bind (pd_peer_host, pd_peer_init_port, pd_peer_alloc_port).
        commit_timeout_s: how long a commit waits for the write's notification.
        pending_ttl_s: an allocation without commit is released after this long.
    Raises:
        zmq.ZMQError: a port is taken (named in the message).
    """

    def __init__(self, backend: Any, channel: Any, host: str, init_port: int, alloc_port: int,
                 commit_timeout_s: float = 5.0, pending_ttl_s: float = 30.0,
                 poll_interval_s: float = 0.1):
        self.backend, self.channel = backend, channel
        self.base = channel.regions[0].data_ptr()
        self.commit_timeout_s, self.pending_ttl_s = commit_timeout_s, pending_ttl_s
        # Idle, the thread sleeps in zmq's poll (GIL released) for up to poll_interval_s:
        # waking often would take the GIL from the engine's own threads (decode slows down).
        # Notifications are read when a commit needs them.
        self.poll_ms = max(1, int(poll_interval_s * 1000))
        self.ctx = zmq.Context.instance()
        self.socks = []
        for port in (init_port, alloc_port):
            s = self.ctx.socket(zmq.REP)
            s.setsockopt(zmq.LINGER, 0)
            try:
                s.bind(tcp(host, port))
            except zmq.ZMQError as e:
                for x in self.socks + [s]:
                    x.close(0)
                raise zmq.ZMQError(e.errno, f"PD decoder cannot bind {tcp(host, port)}: {e}") from None
            self.socks.append(s)
        self.init_sock, self.alloc_sock = self.socks
        self.pending: dict[str, tuple[list, list, float]] = {}
        self.arrived: dict[str, float] = {}
        self.stats = {"allocs": 0, "alloc_full": 0, "commits": 0, "stored_chunks": 0,
                      "expired": 0, "commit_failures": 0, "bad_messages": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pd-receiver", daemon=True)
        self._thread.start()

    # ---- loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(self.poll_ms))
            except zmq.ZMQError:
                return
            for sock in self.socks:
                if sock in ready:
                    self._serve(sock)
            self._expire()

    def _serve(self, sock) -> None:
        try:
            msg = unpack(sock.recv(zmq.NOBLOCK))
            op = msg.get("op")
            if sock is self.init_sock and op == "hello":
                reply = self._hello(msg)
            elif sock is self.alloc_sock and op == "alloc":
                reply = self._alloc(msg)
            elif sock is self.alloc_sock and op == "commit":
                reply = self._commit(msg)
            else:
                raise ValueError(f"unexpected PD message op {op!r}")
        except zmq.Again:
            return
        except Exception as e:  # a bad or failing request is answered, never fatal
            self.stats["bad_messages"] += 1
            logger.warning("PD decoder: request failed: %s", e)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        try:
            sock.send(pack(reply))
        except zmq.ZMQError as e:
            logger.warning("PD decoder: reply not sent: %s", e)

    def _hello(self, msg: dict) -> dict:
        name = self.channel.add_peer(msg.get("md"))
        logger.info("PD decoder: prefiller %s connected", name)
        return {"ok": True, "md": self.channel.agent_metadata()}

    def _alloc(self, msg: dict) -> dict:
        rid, keys, shapes = msg.get("id"), msg.get("keys"), msg.get("shapes")
        if not isinstance(rid, str) or not isinstance(keys, list) or not isinstance(shapes, list) \
                or len(keys) != len(shapes) or rid in self.pending:
            raise ValueError("alloc needs a new id and equally long keys and shapes")
        dtype, fmt = name_to_dtype(str(msg.get("dtype"))), MemoryFormat(int(msg.get("fmt", 1)))
        keys = [CacheEngineKey.from_string(k) for k in keys]
        for shape in shapes:
            if not isinstance(shape, list) or not all(isinstance(x, int) and x > 0 for x in shape):
                raise ValueError(f"bad shape {shape!r}")
        need = sum(self.backend.allocator.reserved_size(s, dtype) for s in shapes)
        if need > self.backend.allocator.capacity_bytes:
            raise ValueError(f"{len(keys)} chunks need {need} bytes, more than the PD buffer's "
                             f"{self.backend.allocator.capacity_bytes} (pd_buffer_size)")
        # All or nothing: held chunks are pinned meanwhile, so this allocation's evictions
        # never break the prefix it completes.
        held = [k for k in keys if self.backend.contains(k, pin=True)]
        offsets: list[int] = []
        got_keys, objs = [], []
        try:
            for key, shape in zip(keys, shapes):
                if key in held:
                    offsets.append(-1)
                    continue
                obj = self.backend.allocate(torch.Size(shape), dtype, fmt)
                if obj is None:
                    self.stats["alloc_full"] += 1
                    self._release(objs)
                    return {"ok": True, "offsets": [], "agent": self.channel.name}
                offsets.append(obj.raw_data.data_ptr() - self.base)
                got_keys.append(key)
                objs.append(obj)
        finally:
            for k in held:
                self.backend.unpin(k)
        if objs:
            self.pending[rid] = (got_keys, objs, time.monotonic() + self.pending_ttl_s)
        self.stats["allocs"] += 1
        return {"ok": True, "offsets": offsets, "agent": self.channel.name}

    def _commit(self, msg: dict) -> dict:
        rid = msg.get("id")
        entry = self.pending.pop(rid, None)
        if entry is None:
            raise ValueError(f"unknown or expired allocation {rid!r}")
        keys, objs, _ = entry
        deadline = time.monotonic() + self.commit_timeout_s
        while rid not in self.arrived and time.monotonic() < deadline:
            self._take_notifications()
            if rid not in self.arrived:
                time.sleep(0.0005)
        if self.arrived.pop(rid, None) is None:
            self._release(objs)
            self.stats["commit_failures"] += 1
            raise TransferError(f"the data of allocation {rid} did not arrive within "
                                f"{self.commit_timeout_s:g} s")
        self.backend.link_prefix(keys, None)
        for key, obj in zip(keys, objs):
            self.backend.put(key, obj)
        self._release(objs)
        self.stats["commits"] += 1
        self.stats["stored_chunks"] += len(keys)
        return {"ok": True, "stored": len(keys)}

    def _take_notifications(self) -> None:
        now = time.monotonic()
        for _peer, raw in self.channel.poll_notifications():
            try:
                msg = unpack(raw)
                if msg.get("op") == "done" and isinstance(msg.get("id"), str):
                    self.arrived[msg["id"]] = now
            except ValueError:
                self.stats["bad_messages"] += 1

    def _expire(self) -> None:
        now = time.monotonic()
        if now < getattr(self, "_next_expiry", 0.0):
            return
        self._next_expiry = now + 1.0
        for rid in [r for r, (_, _, t) in self.pending.items() if t < now]:
            _, objs, _ = self.pending.pop(rid)
            self._release(objs)
            self.stats["expired"] += 1
            logger.warning("PD decoder: allocation %s expired without commit (prefiller gone?)", rid)
        for rid in [r for r, t in self.arrived.items() if t + self.pending_ttl_s < now]:
            del self.arrived[rid]

    @staticmethod
    def _release(objs: list) -> None:
        for obj in objs:
            obj.ref_count_down()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.socks:
            s.close(0)
        for _, objs, _ in self.pending.values():
            self._release(objs)
        self.pending.clear()
