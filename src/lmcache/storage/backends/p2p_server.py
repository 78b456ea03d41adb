"""P2PPeerServer: the serving side of the P2P tier — lets other instances pull chunks out of
this instance's CPU tier through the transfer channel.

Two ZMQ REP ports (LMCache's ``p2p_init_ports`` / ``p2p_lookup_ports``, one per worker), both
answering the same msgpack requests:

* ``hello`` → ``{"metadata": transfer_channel.agent_metadata(), "instance_id", "lookup_url"}``
  (the peers' channels exchange agent metadata here, once per peer and again after a failure);
* ``acquire {keys: [[key string, is_layer_key], ...]}`` → ``{"lease": id, "chunks": [[offset, nbytes, shape,
  dtype name, fmt], ...]}`` for the contiguous prefix of ``keys`` the CPU tier holds: each
  object is held (+1 reference, so neither eviction nor a clear can reuse its memory) until
  ``release`` or until the lease expires (``lease_secs``); offsets are inside the channel's
  region 0 (the allocator's buffer);
* ``release {lease}`` → ``{}``.

Requests are parsed with size limits; a bad one is answered ``{"error": ...}``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

import zmq

from lmcache.controller.protocol import ProtocolError, decode, encode
from lmcache.keys import CacheEngineKey, LayerCacheEngineKey, dtype_to_name

logger = logging.getLogger(__name__)

MAX_KEYS = 65536


class P2PPeerServer:
    """Args:
        allocator_backend: the CPU tier served (LocalCPUBackend: ``get_blocking``).
        transfer_channel: its region 0 must be the allocator's buffer.
        instance_id: this instance (reported in ``hello``).
        host, init_port, lookup_port: where to bind (port 0: a free one).
        lease_secs: how long an acquired chunk stays held without a release.
    """

    def __init__(self, allocator_backend: Any, transfer_channel: Any, instance_id: str,
                 host: str, init_port: int, lookup_port: int, lease_secs: float) -> None:
        self.cpu = allocator_backend
        self.channel = transfer_channel
        self.instance_id = instance_id
        self.lease_secs = float(lease_secs)
        self._base = transfer_channel.regions[0].data_ptr()
        self._ctx = zmq.Context()
        self._socks = []
        ports = []
        for port in (init_port, lookup_port):
            sock = self._ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, 16 * 1024 * 1024)
            if int(port) == 0:
                port = sock.bind_to_random_port(f"tcp://{host}")
            else:
                sock.bind(f"tcp://{host}:{int(port)}")
            self._socks.append(sock)
            ports.append(int(port))
        self.init_port, self.lookup_port = ports
        self.lookup_url = f"{host}:{self.lookup_port}"
        self._leases: dict[int, tuple[float, list]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.stats = {"acquired_chunks": 0, "expired_leases": 0, "bad_requests": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="lmc-p2p-serve", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in self._socks:
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(100))
            self._expire(time.monotonic())
            for sock in self._socks:
                if sock not in ready:
                    continue
                try:
                    body = sock.recv(zmq.NOBLOCK)
                except zmq.ZMQError:
                    continue
                try:
                    reply = self.handle(decode(body))
                except (ProtocolError, KeyError, TypeError, ValueError) as e:
                    self.stats["bad_requests"] += 1
                    reply = {"error": f"{type(e).__name__}: {e}"}
                try:
                    sock.send(encode(reply))
                except zmq.ZMQError:
                    pass

    def handle(self, msg: dict) -> dict:
        op = msg["op"]
        if op == "hello":
            return {"metadata": self.channel.agent_metadata(), "instance_id": self.instance_id,
                    "lookup_url": self.lookup_url}
        if op == "acquire":
            keys = msg["keys"]
            if not isinstance(keys, list) or len(keys) > MAX_KEYS:
                raise ValueError(f"keys must be a list of at most {MAX_KEYS} key strings")
            held, chunks = [], []
            for text, layer in keys:
                cls = LayerCacheEngineKey if layer else CacheEngineKey
                obj = self.cpu.get_blocking(cls.from_string(str(text)))
                if obj is None:
                    break
                held.append(obj)
                chunks.append([obj.tensor.data_ptr() - self._base, obj.nbytes,
                               list(obj.shape), dtype_to_name(obj.dtype), int(obj.fmt)])
            if not held:
                return {"lease": 0, "chunks": []}
            lease = next(self._ids)
            with self._lock:
                self._leases[lease] = (time.monotonic() + self.lease_secs, held)
            self.stats["acquired_chunks"] += len(held)
            return {"lease": lease, "chunks": chunks}
        if op == "release":
            self._drop(int(msg["lease"]))
            return {}
        raise ValueError(f"unknown op {op!r}")

    def _drop(self, lease: int) -> None:
        with self._lock:
            entry = self._leases.pop(lease, None)
        if entry is not None:
            for obj in entry[1]:
                obj.ref_count_down()

    def _expire(self, now: float) -> None:
        with self._lock:
            late = [k for k, (t, _) in self._leases.items() if t < now]
        for lease in late:
            self.stats["expired_leases"] += 1
            self._drop(lease)

    def close(self) -> None:
        """Stop serving and release every lease (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=2)
        for sock in self._socks:
            sock.close()
        self._ctx.term()
        with self._lock:
            leases = list(self._leases)
        for lease in leases:
            self._drop(lease)
