"""LMCacheWorker: one per vLLM worker; the instance's side of the CacheController
(config option ``controller=lmcache_worker``; LMCache's ``enable_controller``).

* **Registers** the worker (instance id, worker id = TP rank, its command address, its tiers,
  its P2P address) on ``controller_reply_url``; re-registers and sends a **full sync** of every
  tier's keys when the controller answers a heartbeat with "unknown" (a restarted controller
  with an in-memory index) or after events were lost.
* **Streams admit/evict events** of every tier (``add_kv_listener``) to ``controller_pull_url``
  in batches (every ``batch_interval_secs`` or ``max_batch_size`` events, one message per tier).
* **Answers commands** on ``lmcache_worker_ports[worker_id]``: ``clear``, ``pin``, ``move``
  (copies chunks between tiers, or pulls them from another instance through the P2P tier),
  ``health``.

The controller being down never affects serving: registration and heartbeats are retried in
the background, events that cannot be sent are dropped (counted in ``stats``) and repaired by a
full sync once the controller is back.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, Optional

import zmq

from lmcache.controller.protocol import ProtocolError, decode, encode, tcp_url
from lmcache.controller.worker_commands import WorkerCommands
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.manager import StorageManager
from lmcache.token_database.base import TokenDatabase

logger = logging.getLogger(__name__)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    return float(value)


class LMCacheWorker:
    """Args:
        metadata: this worker (model name, worker_id = TP rank).
        storage_manager: its tiers (events, clear/pin/move).
        token_database: turns the tokens of pin/move commands into keys.
        lmcache_instance_id: this instance's id (unique in the fleet).
        controller_pull_url / controller_reply_url: the controller's ``host:port``s.
        lmcache_worker_ports: one command port per worker (indexed by worker id).
        host: address the command port binds to and that the controller connects to (a port
            0 in ``lmcache_worker_ports`` picks a free one, registered as it is).
        p2p_host / p2p_init_ports: the P2P tier's address (registered as ``peer_init_url``;
            None without P2P); when the tiers hold the P2P tier, its bound address is used.
        lmcache_worker_heartbeat_time: seconds between heartbeats (None: 10).
        lmcache_worker_heartbeat_delay_time: seconds before the first heartbeat.
        request_timeout_secs: deadline of one request to the controller.
        batch_interval_secs / max_batch_size: event batching.

    Raises:
        ValueError: a missing instance id or URL, too few ports for this worker id, a bad
            timeout (each message names the key).
    """

    def __init__(self, metadata: LMCacheMetadata, storage_manager: StorageManager,
                 token_database: TokenDatabase, lmcache_instance_id: Optional[str] = None,
                 controller_pull_url: Optional[str] = None,
                 controller_reply_url: Optional[str] = None,
                 lmcache_worker_ports: Optional[Sequence[int]] = None, host: str = "127.0.0.1",
                 p2p_host: Optional[str] = None, p2p_init_ports: Optional[Sequence[int]] = None,
                 lmcache_worker_heartbeat_time: Optional[float] = None,
                 lmcache_worker_heartbeat_delay_time: float = 10.0,
                 request_timeout_secs: float = 2.0, batch_interval_secs: float = 0.05,
                 max_batch_size: int = 1000) -> None:
        if not lmcache_instance_id:
            raise ValueError("lmcache_instance_id is required with the controller "
                             f"(enable_controller), got {lmcache_instance_id!r}")
        self.instance_id = str(lmcache_instance_id)
        self.worker_id = metadata.worker_id
        self.pull_url = tcp_url(controller_pull_url, "controller_pull_url")
        self.reply_url = tcp_url(controller_reply_url, "controller_reply_url")
        ports = list(lmcache_worker_ports or [])
        if len(ports) <= self.worker_id:
            raise ValueError(f"lmcache_worker_ports needs a port for worker {self.worker_id} "
                             f"(one per worker), got {lmcache_worker_ports!r}")
        self.host, self.port = host, int(ports[self.worker_id])
        self.peer_init_url = None
        if p2p_host is not None and p2p_init_ports:
            self.peer_init_url = f"{p2p_host}:{int(list(p2p_init_ports)[self.worker_id])}"
        self.heartbeat_secs = _positive("lmcache_worker_heartbeat_time",
                                        lmcache_worker_heartbeat_time or 10.0)
        self.heartbeat_delay = float(lmcache_worker_heartbeat_delay_time or 0.0)
        self.request_timeout = _positive("request_timeout_secs", request_timeout_secs)
        self.batch_interval = _positive("batch_interval_secs", batch_interval_secs)
        self.max_batch_size = int(max_batch_size)
        self.metadata = metadata
        self.storage_manager = storage_manager
        self.token_database = token_database
        self.registered = threading.Event()
        self.stats = {"events_sent": 0, "events_dropped": 0, "registrations": 0,
                      "heartbeats": 0, "request_failures": 0, "commands": 0}
        self._events: deque = deque()
        self._need_sync = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._ctx = zmq.Context()
        self._cmd = self._ctx.socket(zmq.REP)
        self._cmd.setsockopt(zmq.LINGER, 0)
        if self.port == 0:
            self.port = self._cmd.bind_to_random_port(f"tcp://{self.host}")
        else:
            self._cmd.bind(f"tcp://{self.host}:{self.port}")
        p2p = next((t for t in storage_manager.backends if getattr(t, "name", "") == "P2PBackend"),
                   None)
        if p2p is not None:  # the address its server really bound (a port 0 picks a free one)
            self.peer_init_url = p2p.peer_init_url
        self._p2p = p2p
        self.commands = WorkerCommands(storage_manager, token_database, metadata.chunk_size,
                                       self.instance_id)
        for tier in storage_manager.backends:
            if callable(getattr(tier, "keys", None)):  # tiers with an index report events
                tier.add_kv_listener(self._on_kv_event)
        self._threads = [threading.Thread(target=f, name=n, daemon=True) for f, n in (
            (self._control_loop, "lmc-worker-ctl"), (self._push_loop, "lmc-worker-push"),
            (self._command_loop, "lmc-worker-cmd"))]
        for t in self._threads:
            t.start()

    # ---- events -----------------------------------------------------------------------
    def _on_kv_event(self, tier: str, op: int, key) -> None:
        self._events.append((tier, op, key.chunk_hash))

    def _push_loop(self) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, 1000)
        push.connect(self.pull_url)
        try:
            while not self._stop.wait(self.batch_interval):
                if self._need_sync.is_set() and self.registered.is_set():
                    self._need_sync.clear()
                    self._send_full_sync(push)
                self._flush_events(push)
            self._flush_events(push)
        finally:
            push.close()

    def _send(self, push: zmq.Socket, msg: dict, n: int) -> None:
        try:
            push.send(encode(msg), zmq.NOBLOCK)
            self.stats["events_sent"] += n
        except zmq.ZMQError:  # controller unreachable and the queue full: repair by a sync
            self.stats["events_dropped"] += n
            self._need_sync.set()

    def _flush_events(self, push: zmq.Socket) -> None:
        while self._events:
            by_tier: dict[str, list] = {}
            for _ in range(min(len(self._events), self.max_batch_size)):
                tier, op, h = self._events.popleft()
                by_tier.setdefault(tier, []).append([op, h])
            for tier, ops in by_tier.items():
                self._send(push, {"op": "kv_ops", "instance_id": self.instance_id,
                                  "worker_id": self.worker_id, "location": tier, "ops": ops},
                           len(ops))

    def _send_full_sync(self, push: zmq.Socket) -> None:
        for tier in self.storage_manager.backends:
            keys = getattr(tier, "keys", None)
            if callable(keys):
                hashes = sorted({k.chunk_hash for k in keys()})
                self._send(push, {"op": "full_sync", "instance_id": self.instance_id,
                                  "worker_id": self.worker_id, "location": tier.name,
                                  "hashes": hashes}, 0)

    # ---- registration / heartbeats ----------------------------------------------------
    def _info(self, op: str) -> dict:
        return {"op": op, "instance_id": self.instance_id, "worker_id": self.worker_id,
                "ip": self.host, "port": self.port, "peer_init_url": self.peer_init_url,
                "model_name": self.metadata.model_name,
                "tiers": list(self.storage_manager.tier_names)}

    def request(self, msg: dict) -> Optional[dict]:
        """One request to the controller; None when it does not answer in time."""
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(self.request_timeout * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(self.request_timeout * 1000))
        try:
            sock.connect(self.reply_url)
            sock.send(encode(msg))
            reply = decode(sock.recv(), reply=True)
            return None if "error" in reply else reply
        except (zmq.ZMQError, ProtocolError):
            self.stats["request_failures"] += 1
            return None
        finally:
            sock.close()

    def _meet_peers(self, reply: dict) -> None:
        """Hand the peers named in a controller reply to the P2P tier (hellos ahead of pulls)."""
        peers = reply.get("peers")
        if self._p2p is not None and isinstance(peers, list) and peers:
            self._p2p.connect_peers([str(p) for p in peers])

    def _register(self) -> bool:
        reply = self.request(self._info("register"))
        if reply is None:
            return False
        self._meet_peers(reply)
        self.stats["registrations"] += 1
        self.registered.set()
        self._need_sync.set()
        logger.info("LMCacheWorker %s/%d registered with the controller at %s",
                    self.instance_id, self.worker_id, self.reply_url)
        return True

    def _control_loop(self) -> None:
        while not self._stop.is_set() and not self._register():
            self._stop.wait(min(self.heartbeat_secs, 1.0))
        if self._stop.wait(self.heartbeat_delay):
            return
        while not self._stop.is_set():
            reply = self.request(self._info("heartbeat"))
            if reply is None:
                self.registered.clear()
            else:
                self.stats["heartbeats"] += 1
                self._meet_peers(reply)
                if not reply.get("registered", False):
                    self.registered.clear()
                    self._register()
                elif not self.registered.is_set():  # controller back (index kept): resync
                    self.registered.set()
                    self._need_sync.set()
            self._stop.wait(self.heartbeat_secs)

    # ---- commands -----------------------------------------------------------------------
    def _command_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._cmd, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                body = self._cmd.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            try:
                reply = self.handle_command(decode(body))
            except Exception as e:  # noqa: BLE001 - an error reply, never a dead worker
                reply = {"error": f"{type(e).__name__}: {e}"}
            self.stats["commands"] += 1
            try:
                self._cmd.send(encode(reply))
            except zmq.ZMQError:
                pass

    def handle_command(self, msg: dict) -> dict:
        """Run one controller command (``clear``, ``pin``, ``move``, ``health``); see
        :class:`~lmcache.controller.worker_commands.WorkerCommands`."""
        return self.commands.handle(msg)

    def close(self) -> None:
        """Flush pending events, deregister (best effort), stop (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.request_timeout + 2)
        if self.registered.is_set():
            self.request({"op": "deregister", "instance_id": self.instance_id,
                          "worker_id": self.worker_id})
        self._cmd.close()
        self._ctx.term()
