"""P2PClient: the requesting side of the P2P tier — the CacheController's ``p2p_lookup`` (answers
cached for ``lookup_cache_secs``), the peers' ``hello`` (their transfer channels' metadata,
loaded once per peer) and ``acquire`` / ``release`` of the chunks a pull reads.

Requests are msgpack maps (:mod:`lmcache.controller.protocol`) over ZMQ REQ sockets that are
kept: each URL has a few idle connected sockets, a request takes one (or connects a new one)
and gives it back after the reply, so a request is one round trip, not a connect + handshake +
round trip. A socket whose request failed or timed out is closed, never reused (a REQ socket
that did not get its reply cannot send again, and a late reply must not answer the next
request); the next request connects a fresh one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

import zmq

from lmcache.controller.protocol import ProtocolError, decode, encode, tcp_url
from lmcache.keys import CacheEngineKey, LayerCacheEngineKey

logger = logging.getLogger(__name__)

MAX_IDLE_SOCKETS = 4  # per URL: the pull in flight, background pulls and releases


class PendingReply:
    """A request sent on a REQ socket; :meth:`result` waits for its reply (once)."""

    def __init__(self, client: "P2PClient", url: str, sock: Optional[zmq.Socket],
                 deadline: float) -> None:
        self._client, self._url, self._sock, self._deadline = client, url, sock, deadline

    def result(self) -> Optional[dict]:
        """The reply map, or None (no reply by the deadline, an ``{"error"}`` reply, a bad
        message, a socket error). Gives the socket back after a reply, closes it otherwise."""
        sock, self._sock = self._sock, None
        if sock is None:
            return None
        try:
            sock.setsockopt(zmq.RCVTIMEO, max(1, int((self._deadline - time.monotonic()) * 1000)))
            reply = decode(sock.recv(), reply=True)
        except (zmq.ZMQError, ProtocolError):
            sock.close(linger=0)
            return None
        self._client._give_back(self._url, sock)
        return None if "error" in reply else reply


MAX_DOUBLINGS = 4
"""A controller that stays down is asked again after retry_interval x 1, 2, 4, 8, 16, 16, ..."""


class P2PClient:
    """Args:
        channel: the transfer channel (``add_peer`` / ``remove_peer`` of a peer's metadata).
        instance_id, worker_id: who asks (the controller never offers this instance's chunks).
        reply_url: the controller's ``tcp://host:port`` REQ/REP URL.
        lookup_timeout: deadline of one controller lookup, seconds.
        retry_interval: after a failed lookup, lookups are skipped this long, seconds;
            doubled after each further failure in a row (at most ``2**MAX_DOUBLINGS`` times),
            so a controller that stays down costs one ``lookup_timeout`` per 16 intervals.
        lookup_cache_secs: how long a controller answer is reused, seconds.
        hello_timeout: deadline of a peer's hello, seconds.
        stats: counts ``lookups`` and ``lookup_failures`` in this dict.
    """

    def __init__(self, channel: Any, instance_id: str, worker_id: int, reply_url: str,
                 lookup_timeout: float, retry_interval: float, lookup_cache_secs: float,
                 hello_timeout: float, stats: dict) -> None:
        self.channel = channel
        self.instance_id, self.worker_id, self.reply_url = instance_id, worker_id, reply_url
        self.lookup_timeout, self.retry_interval = lookup_timeout, retry_interval
        self.lookup_cache_secs, self.hello_timeout = lookup_cache_secs, hello_timeout
        self.stats = stats
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self._idle: dict[str, list[zmq.Socket]] = {}
        self._peers: dict[str, tuple[str, str]] = {}  # peer_init_url -> (agent, lookup_url)
        self._meeting: dict[str, threading.Lock] = {}  # peer_init_url -> its hello's lock
        self._answers: dict[CacheEngineKey, tuple[float, str]] = {}  # key -> (expiry, peer url)
        self._controller_down_until = 0.0
        self._failures = 0  # failed lookups in a row
        self._closed = False

    # ---- sockets ----------------------------------------------------------------------
    def send(self, url: str, msg: dict, timeout: float) -> PendingReply:
        """Send ``msg`` to ``url`` (``tcp://host:port``) on a kept socket; the reply is due
        within ``timeout`` seconds of now (``PendingReply.result()``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            idle = self._idle.get(url)
            sock = idle.pop() if idle else None
            closed = self._closed
        if closed:
            return PendingReply(self, url, None, deadline)
        try:
            if sock is None:
                sock = self._ctx.socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, 16 * 1024 * 1024)
                sock.connect(url)
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
            sock.send(encode(msg))
        except zmq.ZMQError:
            if sock is not None:
                sock.close(linger=0)
            return PendingReply(self, url, None, deadline)
        return PendingReply(self, url, sock, deadline)

    def request(self, url: str, msg: dict, timeout: float) -> Optional[dict]:
        """One round trip: the reply map, or None (see :meth:`PendingReply.result`)."""
        return self.send(url, msg, timeout).result()

    def _give_back(self, url: str, sock: zmq.Socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(url, [])
            if not self._closed and len(idle) < MAX_IDLE_SOCKETS:
                idle.append(sock)
                return
        sock.close(linger=0)

    def _drop_sockets(self, url: str) -> None:
        with self._lock:
            idle = self._idle.pop(url, [])
        for sock in idle:
            sock.close(linger=0)

    # ---- controller and peers -----------------------------------------------------------
    def lookup(self, keys: Sequence[CacheEngineKey]) -> tuple[int, str]:
        """(chunks of the prefix of ``keys`` a peer holds, its peer_init_url) from the
        controller; (0, "") when none does or the controller did not answer."""
        if time.monotonic() < self._controller_down_until or not keys:
            return 0, ""
        self.stats["lookups"] += 1
        reply = self.request(self.reply_url, {
            "op": "p2p_lookup", "instance_id": self.instance_id, "worker_id": self.worker_id,
            "hashes": [k.chunk_hash for k in keys]}, self.lookup_timeout)
        if reply is None:
            self.stats["lookup_failures"] += 1
            self._failures += 1
            self._controller_down_until = time.monotonic() + self.retry_interval * 2 ** min(
                self._failures - 1, MAX_DOUBLINGS)
            return 0, ""
        self._failures = 0
        n, url = int(reply.get("num_hit_chunks", 0)), str(reply.get("peer_init_url") or "")
        if n and url:
            expiry = time.monotonic() + self.lookup_cache_secs
            with self._lock:
                if len(self._answers) > 100000:
                    self._answers.clear()
                for key in keys[:n]:
                    self._answers[key] = (expiry, url)
        return (n, url) if url else (0, "")

    def cached_peer(self, key: CacheEngineKey) -> Optional[str]:
        """The peer_init_url of a controller answer for ``key`` still fresh, else None."""
        with self._lock:
            answer = self._answers.get(key)
        return answer[1] if answer is not None and answer[0] > time.monotonic() else None

    def peer(self, init_url: str) -> Optional[tuple[str, str]]:
        """(channel agent name, lookup url) of the peer at ``init_url``; says hello first if it
        is new (None when it does not answer or its metadata is refused). One hello per peer
        at a time: a concurrent caller (a pull, a background hello) waits for it and shares
        its answer (a second ``add_peer`` would replace the agent under a running read)."""
        with self._lock:
            known = self._peers.get(init_url)
            meeting = self._meeting.setdefault(init_url, threading.Lock())
        if known is not None:
            return known
        with meeting:
            with self._lock:
                known = self._peers.get(init_url)
            return known if known is not None else self._hello(init_url)

    def _hello(self, init_url: str) -> Optional[tuple[str, str]]:
        url = tcp_url(init_url, "peer_init_url")
        reply = self.request(url, {"op": "hello"}, self.hello_timeout)
        self._drop_sockets(url)  # (one hello per peer: keep no socket for it)
        if reply is None or not isinstance(reply.get("metadata"), bytes):
            return None
        try:
            agent = self.channel.add_peer(reply["metadata"])
        except Exception as e:  # noqa: BLE001 - a peer we cannot load is no peer
            logger.warning("P2P peer at %s: its channel metadata was refused: %s", init_url, e)
            return None
        peer = (agent, tcp_url(str(reply["lookup_url"]), "lookup_url"))
        with self._lock:
            self._peers[init_url] = peer
        return peer

    def knows(self, init_url: str) -> bool:
        """Whether the peer at ``init_url`` said hello and was not forgotten since."""
        with self._lock:
            return init_url in self._peers

    def forget_peer(self, init_url: str, drop_channel_peer: bool = False) -> None:
        """Say hello again before the next pull from ``init_url``; forget every cached answer
        and the peer's idle sockets (with ``drop_channel_peer``, its channel metadata too)."""
        with self._lock:
            peer = self._peers.pop(init_url, None)
            self._answers.clear()
        if peer is None:
            return
        self._drop_sockets(peer[1])
        if drop_channel_peer:
            try:
                self.channel.remove_peer(peer[0])
            except Exception:  # noqa: BLE001 - already gone
                pass

    @staticmethod
    def acquire_message(keys: Sequence[CacheEngineKey]) -> dict:
        return {"op": "acquire",
                "keys": [[k.to_string(), isinstance(k, LayerCacheEngineKey)] for k in keys]}

    def close(self) -> None:
        """Close the idle sockets and the ZMQ context (idempotent; a socket still in use is
        closed when its request ends)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock in socks:
                sock.close(linger=0)
        self._ctx.term()
