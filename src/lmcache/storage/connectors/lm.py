"""LMConnector: the ``lm://host:port`` remote, lmcache's own TCP cache server."""

from __future__ import annotations

import queue
import socket
from typing import Optional
from urllib.parse import urlsplit

from lmcache.server.protocol import (
    RESPONSE,
    Op,
    ProtocolError,
    Status,
    pack_request,
    recv_exact,
    unpack_response,
)
from lmcache.storage.connectors.base import Buffer, RemoteConnector
from lmcache.storage.connectors.wire_format import (
    FILE_HEADER_SIZE,
    FILE_MAGIC,
    DEFAULT_MAX_PAYLOAD_BYTES,
    WireFormatError,
    split_file_header,
)


class LMConnector(RemoteConnector):
    """Client of :class:`lmcache.server.cache_server.LMCacheServer` (protocol in
    :mod:`lmcache.server.protocol`).

    Each value is one ``wire_format`` blob (magic, 36-byte metadata, payload). Sockets are kept
    in a small pool (one per concurrent caller, up to ``max_connections``); a socket that saw an
    error is closed, so the next call reconnects. Every socket operation times out after
    ``blocking_timeout_secs``.

    Args:
        url: ``lm://host:port``.
        blocking_timeout_secs, retry_interval_secs, max_payload_bytes: see RemoteConnector.
        max_connections: sockets kept open for reuse, >= 1.

    Raises:
        ValueError: a url that is not ``lm://host:port``, or max_connections < 1.
    """

    name = "lm"
    transport_errors = (OSError, ProtocolError)

    def __init__(
        self,
        url: str,
        blocking_timeout_secs: float = 10.0,
        retry_interval_secs: float = 1.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_connections: int = 8,
    ) -> None:
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
        self.address = (parts.hostname, port)
        self._pool: queue.LifoQueue[socket.socket] = queue.LifoQueue(maxsize=max_connections)

    # ---- socket pool --------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        sock = socket.create_connection(self.address, timeout=self.blocking_timeout_secs)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _release(self, sock: socket.socket) -> None:
        if self._closed:
            sock.close()
            return
        try:
            self._pool.put_nowait(sock)
        except queue.Full:
            sock.close()

    def _request(
        self, op: Op, key: str, value: tuple[Buffer, ...] = ()
    ) -> tuple[Status, Optional[bytearray]]:
        key_bytes = key.encode("utf-8")
        value_len = sum(memoryview(v).nbytes for v in value)
        sock = self._connect()
        try:
            sock.sendall(pack_request(op, key_bytes, value_len))
            for part in value:
                sock.sendall(part)
            status, n = unpack_response(
                bytes(recv_exact(sock, RESPONSE.size)), self.max_payload_bytes + FILE_HEADER_SIZE
            )
            body = recv_exact(sock, n) if n else None
        except BaseException:
            sock.close()
            raise
        self._release(sock)
        if status == Status.ERROR:
            raise RuntimeError(f"lm server error: {(body or b'').decode('utf-8', 'replace')}")
        return status, body

    # ---- hooks --------------------------------------------------------------------------
    def _exists(self, key: str) -> bool:
        return self._request(Op.EXISTS, key)[0] == Status.OK

    def _get(self, key: str) -> Optional[tuple[bytes, Buffer]]:
        status, body = self._request(Op.GET, key)
        if status != Status.OK or body is None:
            return None
        try:
            metadata = split_file_header(body)
        except WireFormatError:
            return None
        return metadata, memoryview(body)[FILE_HEADER_SIZE:]

    def _put(self, key: str, metadata: bytes, payload: Buffer) -> None:
        status, _ = self._request(Op.PUT, key, (FILE_MAGIC, metadata, payload))
        if status != Status.OK:
            raise RuntimeError(f"lm server refused PUT of {key!r}: {status.name}")

    def _remove(self, key: str) -> bool:
        return self._request(Op.REMOVE, key)[0] == Status.OK

    def _close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    def _on_transport_error(self) -> None:
        self._close()
