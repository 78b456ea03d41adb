"""LMConnector: the ``lm://host:port`` remote (lmcache's server or LMCache 0.5.6's server)."""

from __future__ import annotations

import queue
import select
import socket
import struct
from typing import Callable, Optional, TypeVar
from urllib.parse import urlsplit

from lmcache.serde.wire.remote_metadata import DEFAULT_MAX_PAYLOAD_BYTES
from lmcache.server.protocol import (
    EXT_MAGIC,
    MAX_EXTRA_BYTES,
    REPLY,
    Code,
    Command,
    ProtocolError,
    Reply,
    check_token,
    hello_key,
    pack_request,
    recv_exact,
    recv_into,
    unpack_reply,
)
from lmcache.storage.connectors.base import Buffer, RemoteConnector

T = TypeVar("T")
# LMCache's one-group RemoteMetadata: length, fmt, dtype code, shape[0..3] (int32 each)
LMCACHE_HEADER = struct.Struct("<7i")
EXISTS_BATCH = 256  # EXIST requests pipelined per round trip


class TokenRefused(ConnectionRefusedError):
    """The server requires another token (or one this connector was not given)."""


class _Conn:
    """A socket and what its HELLO told about the server."""

    def __init__(self, sock: socket.socket, extended: bool) -> None:
        self.sock = sock
        self.extended = extended  # lmcache's server (extensions) vs LMCache's plain server


class LMConnector(RemoteConnector):
    """Client of an ``lm://`` cache server: lmcache's ``lmcache-server`` or LMCache's
    ``python -m lmcache.v1.server`` (protocol in :mod:`lmcache.server.protocol`).

    The metadata handed in by the backend is LMCache's 28-byte header (length, fmt, dtype, 4
    shape slots) followed by lmcache's checksum. The header travels in LMCache's request
    fields, so an LMCache client reading the entry gets the layout it expects; the checksum
    is kept by lmcache's server beside the entry (extension bytes LMCache's GET never sends).
    Against LMCache's server, which has nowhere to keep it, entries are written and read back
    without checksum (28-byte metadata: checked by length and shape only), puts are not
    acknowledged (the protocol has no reply to PUT) and remove() is not available (False).

    Each new socket first sends lmcache's HELLO (carrying ``token``); a pooled socket that the
    server closed while idle is noticed before use (and dropped), and a request that still fails
    on a broken connection is retried once on a fresh one by RemoteConnector (a server restart
    costs at most one retry, not an outage).

    Args:
        url: ``lm://host:port``.
        blocking_timeout_secs, retry_interval_secs, max_payload_bytes: see RemoteConnector.
        max_connections: sockets kept open for reuse, >= 1.
        token: shared secret of a server started with a token (1..100 of A-Za-z0-9._~+/=-).
        token_file: file holding the token instead (stripped); not both.

    Raises:
        ValueError: a url that is not ``lm://host:port``, max_connections < 1, a bad token,
            or both token and token_file.
        OSError: token_file unreadable.
    """

    name = "lm"
    transport_errors = (OSError, ProtocolError)

    def __init__(self, url: str, blocking_timeout_secs: float = 10.0,
                 retry_interval_secs: float = 1.0,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES, max_connections: int = 8,
                 token: Optional[str] = None, token_file: Optional[str] = None) -> None:
        super().__init__(url, blocking_timeout_secs, retry_interval_secs, max_payload_bytes)
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "lm" or not parts.hostname or port is None:
            raise ValueError(f"lm connector url must be lm://host:port, got {url!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if token is not None and token_file is not None:
            raise ValueError("give the lm connector token or token_file, not both")
        if token_file is not None:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        self._hello = hello_key(check_token(token))
        self.address = (parts.hostname, port)
        self._pool: queue.LifoQueue[_Conn] = queue.LifoQueue(maxsize=max_connections)
        self.stats.update(plain_server=0)

    # ---- connections --------------------------------------------------------------------
    def _open(self) -> _Conn:
        sock = socket.create_connection(self.address, timeout=self.blocking_timeout_secs)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(pack_request(Command.HEALTH, self._hello))
            reply = self._reply(sock)
            if reply.code == Code.UNAUTHORIZED:
                raise TokenRefused(f"lm server at {self._safe_url()} refused the token")
            if reply.code != Code.SUCCESS:
                raise ProtocolError(f"HELLO answered {reply.code.name}")
        except BaseException:
            sock.close()
            raise
        extended = reply.length == EXT_MAGIC
        if not extended and not self.stats["plain_server"]:
            self.stats["plain_server"] = 1  # LMCache's server: no checksum, acks or remove
        return _Conn(sock, extended)

    def _checkout(self) -> _Conn:
        while True:
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                return self._open()
            readable, _, _ = select.select([conn.sock], [], [], 0)
            if not readable:  # an idle socket with something to read was closed or is broken
                return conn
            conn.sock.close()

    def _release(self, conn: _Conn) -> None:
        if self._closed:
            conn.sock.close()
            return
        try:
            self._pool.put_nowait(conn)
        except queue.Full:
            conn.sock.close()

    def _call(self, fn: Callable[[_Conn], T]) -> T:
        """``fn(conn)`` on a pooled (checked) or new connection. A connection error is raised;
        RemoteConnector then drops the pool and retries once on a fresh connection."""
        return self._run(self._checkout(), fn)

    def _run(self, conn: _Conn, fn: Callable[[_Conn], T]) -> T:
        try:
            result = fn(conn)
        except _Refused:
            self._release(conn)  # a refusal leaves the connection in sync
            raise
        except BaseException:
            conn.sock.close()
            raise
        self._release(conn)
        return result

    def _reply(self, sock: socket.socket) -> Reply:
        sock.settimeout(self.blocking_timeout_secs)
        return unpack_reply(recv_exact(sock, REPLY.size))

    def _key(self, key: str) -> bytes:
        return key.encode("utf-8")

    # ---- hooks --------------------------------------------------------------------------
    def _exists(self, key: str) -> bool:
        return self._batched_exists([key])[0]

    def _batched_exists(self, keys: list[str]) -> list[bool]:
        def run(conn: _Conn) -> list[bool]:
            found: list[bool] = []
            for i in range(0, len(keys), EXISTS_BATCH):
                part = keys[i:i + EXISTS_BATCH]
                conn.sock.sendall(b"".join(pack_request(Command.EXIST, self._key(k))
                                           for k in part))
                found.extend(self._reply(conn.sock).code == Code.SUCCESS for _ in part)
            return found
        encoded = [self._key(k) for k in keys]
        for k in encoded:  # a bad key is the caller's error, not a broken connection
            pack_request(Command.EXIST, k)
        return self._call(run)

    def _get(self, key: str) -> Optional[tuple[bytes, Buffer]]:
        k = self._key(key)
        pack_request(Command.GET, k)

        def run(conn: _Conn) -> Optional[tuple[bytes, Buffer]]:
            conn.sock.sendall(pack_request(Command.X_GET if conn.extended else Command.GET, k))
            reply = self._reply(conn.sock)
            if reply.code != Code.SUCCESS:
                return None
            n_extra = reply.location if conn.extended else 0
            if reply.length > self.max_payload_bytes or n_extra > MAX_EXTRA_BYTES:
                raise ProtocolError(f"reply announces {reply.length} + {n_extra} bytes; "
                                    f"limits {self.max_payload_bytes} + {MAX_EXTRA_BYTES}")
            extra = bytes(recv_exact(conn.sock, n_extra)) if n_extra else b""
            body = bytearray(reply.length)
            recv_into(conn.sock, memoryview(body))
            header = LMCACHE_HEADER.pack(reply.length, reply.fmt, reply.dtype, *reply.shape)
            return header + extra, memoryview(body)
        return self._call(run)

    def _put(self, key: str, metadata: bytes, payload: Buffer) -> None:
        k = self._key(key)
        if len(metadata) < LMCACHE_HEADER.size or len(metadata) - LMCACHE_HEADER.size > \
                MAX_EXTRA_BYTES:
            raise ValueError(f"metadata of {len(metadata)} bytes; expected "
                             f"{LMCACHE_HEADER.size}..{LMCACHE_HEADER.size + MAX_EXTRA_BYTES}")
        length, fmt, dtype, *shape = LMCACHE_HEADER.unpack_from(metadata)
        extra = bytes(metadata[LMCACHE_HEADER.size:])
        view = memoryview(payload).cast("B")
        if view.nbytes != length:
            raise ValueError(f"payload is {view.nbytes} bytes, metadata says {length}")
        pack_request(Command.PUT, k, length, fmt, dtype, tuple(shape))

        def run(conn: _Conn) -> None:
            if conn.extended:
                conn.sock.sendall(pack_request(Command.X_PUT, k, length, fmt, dtype,
                                               tuple(shape), len(extra)) + extra)
            else:
                conn.sock.sendall(pack_request(Command.PUT, k, length, fmt, dtype,
                                               tuple(shape)))
            conn.sock.sendall(view)
            if conn.extended:
                code = self._reply(conn.sock).code
                if code != Code.SUCCESS:
                    raise _Refused(f"lm server refused PUT of {key!r}: {code.name}")
        self._call(run)

    def _remove(self, key: str) -> bool:
        k = self._key(key)
        pack_request(Command.X_REMOVE, k)

        def run(conn: _Conn) -> bool:
            if not conn.extended:
                return False  # LMCache's server cannot delete
            conn.sock.sendall(pack_request(Command.X_REMOVE, k))
            return self._reply(conn.sock).code == Code.SUCCESS
        return self._call(run)

    def _close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().sock.close()
            except queue.Empty:
                return

    def _on_transport_error(self) -> None:
        self._close()


class _Refused(RuntimeError):
    """The server answered a PUT with TOO_LARGE or BUSY (the connection stays usable)."""
