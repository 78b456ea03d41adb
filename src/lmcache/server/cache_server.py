"""LMCacheServer: lmcache's own TCP cache server behind ``lm://host:port`` URLs.

An asyncio server that keeps opaque values in memory, bounded by ``max_size_bytes`` with
least-recently-used eviction, and speaks the header protocol of
:mod:`lmcache.server.protocol`. Start it with ``python -m lmcache.server HOST PORT`` or the
``lmcache-server`` console script.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Optional

from lmcache.server.protocol import (
    REQUEST,
    Op,
    ProtocolError,
    Status,
    pack_response,
    unpack_request,
)

logger = logging.getLogger(__name__)


class LMCacheServer:
    """In-memory key → bytes store served over TCP.

    Args:
        host: address to bind (e.g. ``127.0.0.1``).
        port: TCP port; 0 picks a free one (read it back from :attr:`port` after start).
        max_size_bytes: total bytes of stored values; older values are evicted (LRU) to make
            room. > 0.
        max_value_bytes: largest single value accepted, in bytes; larger PUTs are answered
            TOO_LARGE (the bytes are drained, nothing is stored). > 0.

    Raises:
        ValueError: a non-positive size limit.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 65432,
        max_size_bytes: int = 4 << 30,
        max_value_bytes: int = 1 << 30,
    ) -> None:
        if max_size_bytes <= 0 or max_value_bytes <= 0:
            raise ValueError(
                f"max_size_bytes and max_value_bytes must be > 0, got "
                f"{max_size_bytes} and {max_value_bytes}"
            )
        self.host = host
        self.port = port
        self.max_size_bytes = int(max_size_bytes)
        self.max_value_bytes = int(max_value_bytes)
        self._store: OrderedDict[bytes, bytes] = OrderedDict()
        self.used_bytes = 0
        self._server: Optional[asyncio.base_events.Server] = None

    async def start(self) -> None:
        """Bind and start accepting connections; sets :attr:`port`."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("lmcache server listening on %s:%d", self.host, self.port)

    async def serve_forever(self) -> None:
        """start() then serve until cancelled."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    # ---- storage ------------------------------------------------------------------------
    def _put(self, key: bytes, value: bytes) -> Status:
        if len(value) > self.max_size_bytes:
            return Status.TOO_LARGE
        old = self._store.pop(key, None)
        if old is not None:
            self.used_bytes -= len(old)
        while self._store and self.used_bytes + len(value) > self.max_size_bytes:
            _, victim = self._store.popitem(last=False)
            self.used_bytes -= len(victim)
        self._store[key] = value
        self.used_bytes += len(value)
        return Status.OK

    def _get(self, key: bytes) -> Optional[bytes]:
        value = self._store.get(key)
        if value is not None:
            self._store.move_to_end(key)
        return value

    def _remove(self, key: bytes) -> bool:
        value = self._store.pop(key, None)
        if value is None:
            return False
        self.used_bytes -= len(value)
        return True

    # ---- connection loop ----------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    header = await reader.readexactly(REQUEST.size)
                except asyncio.IncompleteReadError:
                    return  # client closed between requests
                op, key_len, value_len = unpack_request(header, self.max_value_bytes)
                key = await reader.readexactly(key_len)
                await self._serve_one(op, key, value_len, reader, writer)
                await writer.drain()
        except ProtocolError as e:
            logger.warning("closing connection from %s: %s", peer, e)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            logger.debug("connection from %s lost: %r", peer, e)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _serve_one(
        self,
        op: Op,
        key: bytes,
        value_len: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if op == Op.PUT:
            if value_len > self.max_value_bytes:
                await self._drain(reader, value_len)
                writer.write(pack_response(Status.TOO_LARGE))
                return
            value = await reader.readexactly(value_len)
            writer.write(pack_response(self._put(key, value)))
        elif op == Op.GET:
            value = self._get(key)
            if value is None:
                writer.write(pack_response(Status.NOT_FOUND))
            else:
                writer.write(pack_response(Status.OK, len(value)))
                writer.write(value)
        elif op == Op.EXISTS:
            writer.write(pack_response(Status.OK if key in self._store else Status.NOT_FOUND))
        elif op == Op.REMOVE:
            writer.write(pack_response(Status.OK if self._remove(key) else Status.NOT_FOUND))
        else:  # Op.PING
            writer.write(pack_response(Status.OK))

    @staticmethod
    async def _drain(reader: asyncio.StreamReader, n: int) -> None:
        while n > 0:
            chunk = await reader.read(min(n, 1 << 20))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(chunk)
