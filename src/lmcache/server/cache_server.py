"""LMCacheServer: lmcache's TCP cache server behind ``lm://host:port`` URLs.

It speaks LMCache 0.5.6's cache-server protocol (so LMCache's own ``lm://`` connector works
against it) plus lmcache's extensions (:mod:`lmcache.server.protocol`). One thread serves each
connection with blocking sockets: values are received straight into their final buffer and
sent straight from the stored buffer, so a slow reader costs no copy of a value (the kernel's
socket buffer is the only one), only its thread until the write times out. A value's buffer is
allocated untouched (numpy.empty), so memory grows with the bytes that really arrive.

Resources are bounded: stored bytes (LRU eviction), bytes of PUT values being received at once
(the in-flight budget: a PUT waits for room, then is drained and refused as BUSY), the size of
one value, the number of connections (at the limit the connection idle the longest is closed
to admit a new one; with none idle the new one is refused), idle and read timeouts (a read or
write also ends by ``read_timeout_s + size / 1 MiB/s``), and an optional shared token.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import resource
import socket
import threading
import time
from typing import Optional

import numpy

from lmcache.server.protocol import (
    EXT_MAGIC,
    EXT_VERSION,
    MAX_EXTRA_BYTES,
    MAX_VALUE_BYTES,
    REQUEST,
    Code,
    Command,
    ProtocolError,
    Request,
    check_token,
    is_hello,
    pack_reply,
    recv_exact,
    recv_into,
    send_all,
    token_of_hello,
    unpack_request,
)
from lmcache.server.connection_table import ConnectionTable, shutdown
from lmcache.server.server_metrics import ServerMetrics
from lmcache.server.value_store import Entry, ValueStore

logger = logging.getLogger(__name__)

MIN_RATE_BYTES_PER_S = 1 << 20  # a value moves at least this fast, or its connection is dropped
BUDGET_WAIT_S = 2.0  # longest wait of a PUT for in-flight budget
FD_RESERVE = 16  # descriptors kept for the listener, metrics, logs


MAX_TIMEOUT_S = 86400  # one day; socket.settimeout overflows far above it

class LMCacheServer:
    """In-memory key → value store served over TCP.

    Args:
        host: address to bind. Anything but a loopback address without ``token`` logs a warning.
        port: TCP port; 0 picks a free one (read :attr:`port` after :meth:`start`).
        max_size_bytes: total bytes of stored values (LRU eviction); > 0.
        max_value_bytes: largest single value, bytes; 0 < it <= max_inflight_bytes and < 2 GiB.
        max_inflight_bytes: bytes of PUT values being received at once; > 0.
        max_connections: open client connections; >= 1, lowered (with a warning) to the
            process' open-file limit minus 16.
        idle_timeout_s: a connection with no request for this long is closed; 0 = never.
        read_timeout_s: longest wait for the next bytes of a started message (and for the
            HELLO of a token-protected server); > 0.
        token: shared secret clients must present in their HELLO; None = no check.

    Raises:
        ValueError: a limit out of range, or a malformed token.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 65432,
                 max_size_bytes: int = 4 << 30, max_value_bytes: int = 256 << 20,
                 max_inflight_bytes: int = 512 << 20, max_connections: int = 256,
                 idle_timeout_s: float = 600.0, read_timeout_s: float = 10.0,
                 token: Optional[str] = None) -> None:
        if not 0 < max_value_bytes <= min(max_inflight_bytes, MAX_VALUE_BYTES):
            raise ValueError(f"max_value_bytes must be in 1..min(max_inflight_bytes "
                             f"{max_inflight_bytes}, {MAX_VALUE_BYTES}), got {max_value_bytes}")
        if (max_connections < 1 or not 0 <= idle_timeout_s <= MAX_TIMEOUT_S
                or not 0 < read_timeout_s <= MAX_TIMEOUT_S):
            raise ValueError(f"need max_connections >= 1, idle_timeout_s in [0, {MAX_TIMEOUT_S}] "
                             f"and read_timeout_s in (0, {MAX_TIMEOUT_S}] (sockets refuse longer "
                             f"timeouts); got {max_connections}, {idle_timeout_s}, "
                             f"{read_timeout_s}")
        self.host, self.port = host, port
        self.max_value_bytes = int(max_value_bytes)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and max_connections > soft - FD_RESERVE:
            logger.warning("max_connections %d lowered to %d: the open-file limit is %d",
                           max_connections, max(1, soft - FD_RESERVE), soft)
            max_connections = max(1, soft - FD_RESERVE)
        self.max_connections = int(max_connections)
        self.idle_timeout_s = float(idle_timeout_s)
        self.read_timeout_s = float(read_timeout_s)
        self._token = check_token(token)
        self.store = ValueStore(max_size_bytes, max_inflight_bytes)
        self._listener: Optional[socket.socket] = None
        self._stopping = threading.Event()
        self.metrics = ServerMetrics(
            connections=lambda: len(self._conns), stored_bytes=lambda: self.store.used_bytes,
            stored_keys=lambda: len(self.store), inflight_bytes=lambda: self.store.inflight_bytes,
            evictions=lambda: self.store.evictions)
        self._conns = ConnectionTable(
            self.max_connections, on_refused=self.metrics.refused_connections.inc,
            on_evicted=self.metrics.dropped_connections.labels("evicted").inc)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Bind and listen (sets :attr:`port`); :meth:`serve_forever` then accepts."""
        if self._token is None and not _is_loopback(self.host):
            logger.warning("lm server binds %s without a token: anyone who reaches this port "
                           "can read and write the cache (set --token-file)", self.host)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((self.host, self.port))
            self._listener.listen(128)
        except OSError as e:
            self._listener.close()
            raise OSError(e.errno, f"cannot listen on {self.host}:{self.port}: "
                                   f"{e.strerror or e}") from None
        self.port = self._listener.getsockname()[1]
        logger.info("lmcache server listening on %s:%d (token %s)", self.host, self.port,
                    "required" if self._token else "off")

    def serve_forever(self) -> None:
        """:meth:`start` if needed, then accept connections until :meth:`stop`."""
        if self._listener is None:
            self.start()
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                logger.warning("accept failed: %s", e)
                time.sleep(0.05)
                continue
            if self._conns.admit(conn):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=self._serve_connection, args=(conn, peer),
                                 daemon=True, name=f"lm-conn-{peer}").start()

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        self._stopping.set()
        if self._listener is not None:
            shutdown(self._listener)
            self._listener.close()
        self._conns.shutdown_all()

    # ---- connections --------------------------------------------------------------------
    def _serve_connection(self, conn: socket.socket, peer: object) -> None:
        authed = self._token is None
        reason: Optional[str] = None
        header = bytearray(REQUEST.size)
        view = memoryview(header)
        try:
            while self._conns.set_idle(conn, True):
                wait = (self.idle_timeout_s or None) if authed else self.read_timeout_s
                conn.settimeout(wait)
                try:
                    recv_into(conn, view[:1])
                except TimeoutError:
                    reason = "idle" if authed else "unauthorized"
                    return
                if not self._conns.set_idle(conn, False):
                    return
                recv_into(conn, view[1:], step_timeout=self.read_timeout_s,
                          deadline=time.monotonic() + self.read_timeout_s)
                req = unpack_request(header)
                if not authed:
                    if not (req.command == Command.HEALTH and is_hello(req.key)):
                        reason = "unauthorized"
                        return
                if req.command == Command.HEALTH and is_hello(req.key):
                    if not self._token_ok(req.key):
                        self._send(conn, pack_reply(Code.UNAUTHORIZED))
                        reason = "unauthorized"
                        return
                    authed = True
                self.metrics.requests.labels(req.command.name).inc()
                self._serve_one(conn, req)
        except ProtocolError as e:
            reason = "protocol"
            logger.warning("closing connection from %s: %s", peer, e)
        except TimeoutError:
            reason = "timeout"
        except OSError as e:  # ConnectionError included: the peer went away
            logger.debug("connection from %s lost: %r", peer, e)
        finally:
            if reason is not None:
                self.metrics.dropped_connections.labels(reason).inc()
            self._conns.remove(conn)
            conn.close()

    def _token_ok(self, key: bytes) -> bool:
        if self._token is None:
            return True
        given = token_of_hello(key)
        return given is not None and hmac.compare_digest(given.encode(), self._token.encode())

    # ---- requests -----------------------------------------------------------------------
    def _serve_one(self, conn: socket.socket, req: Request) -> None:
        cmd = req.command
        if cmd in (Command.PUT, Command.X_PUT):
            self._put(conn, req)
        elif cmd in (Command.GET, Command.X_GET):
            entry = self.store.get(req.key)
            if entry is None:
                self.metrics.get_misses.inc()
                self._send(conn, pack_reply(Code.FAIL))
                return
            self.metrics.get_hits.inc()
            extra = entry.extra if cmd == Command.X_GET else b""
            self._send(conn, pack_reply(Code.SUCCESS, len(entry.data), entry.fmt, entry.dtype,
                                        entry.shape, len(extra)) + extra)
            self._send(conn, memoryview(entry.data))
        elif cmd == Command.EXIST:
            found = self.store.contains(req.key)
            self._send(conn, pack_reply(Code.SUCCESS if found else Code.FAIL))
        elif cmd == Command.HEALTH:
            if is_hello(req.key):
                self._send(conn, pack_reply(Code.SUCCESS, EXT_MAGIC, location=EXT_VERSION))
            else:
                self._send(conn, pack_reply(Code.SUCCESS))
        elif cmd == Command.X_REMOVE:
            removed = self.store.remove(req.key)
            self._send(conn, pack_reply(Code.SUCCESS if removed else Code.FAIL))
        # Command.LIST: LMCache's server does not answer it either

    def _put(self, conn: socket.socket, req: Request) -> None:
        acked = req.command == Command.X_PUT
        n_extra = req.location if acked else 0
        if n_extra > MAX_EXTRA_BYTES:
            raise ProtocolError(f"X_PUT with {n_extra} extra bytes (limit {MAX_EXTRA_BYTES})")
        total = req.length + n_extra
        deadline = time.monotonic() + self.read_timeout_s + total / MIN_RATE_BYTES_PER_S
        if req.length > self.max_value_bytes:
            if not acked:  # LMCache's PUT has no reply: dropping the connection is the answer
                raise ProtocolError(f"PUT of {req.length} bytes above --max-value-mb")
            self._refuse(conn, "too_large", total, deadline)
            return
        if not self.store.reserve(total, min(self.read_timeout_s, BUDGET_WAIT_S)):
            self._refuse(conn, "busy", total, deadline, acked)
            return
        try:
            extra = bytes(recv_exact(conn, n_extra, deadline=deadline,
                                     step_timeout=self.read_timeout_s))
            data = numpy.empty(req.length, numpy.uint8)  # pages are touched as bytes arrive
            recv_into(conn, memoryview(data), deadline=deadline,
                      step_timeout=self.read_timeout_s)
        finally:
            self.store.release(total)
        stored = self.store.put(req.key, Entry(req.fmt, req.dtype, req.shape, extra, data))
        if not stored:
            self.metrics.refused_puts.labels("too_large").inc()
        if acked:
            self._send(conn, pack_reply(Code.SUCCESS if stored else Code.TOO_LARGE))

    def _refuse(self, conn: socket.socket, reason: str, total: int, deadline: float,
                acked: bool = True) -> None:
        """Read and drop ``total`` bytes through a small buffer, then answer (if acked)."""
        self.metrics.refused_puts.labels(reason).inc()
        scratch = memoryview(bytearray(min(total, 64 << 10)))
        left = total
        while left > 0:
            k = min(left, scratch.nbytes)
            recv_into(conn, scratch[:k], deadline=deadline, step_timeout=self.read_timeout_s)
            left -= k
        if acked:
            self._send(conn, pack_reply(Code.TOO_LARGE if reason == "too_large" else Code.BUSY))

    def _send(self, conn: socket.socket, data: bytes | memoryview) -> None:
        """Send ``data``: each wait <= read_timeout_s, all by read_timeout_s + size / 1 MiB/s."""
        n = memoryview(data).nbytes
        send_all(conn, data, step_timeout=self.read_timeout_s,
                 deadline=time.monotonic() + self.read_timeout_s + n / MIN_RATE_BYTES_PER_S)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
