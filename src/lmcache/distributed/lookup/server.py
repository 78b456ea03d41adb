"""LookupServer: the worker side of the scheduler→worker lookup (ZMQ REP on an ipc:// endpoint)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading

import torch
import zmq

from lmcache.distributed.lookup import protocol

logger = logging.getLogger(__name__)


class LookupServer:
    """Answers LookupClient requests by running ``engine.lookup`` in this worker.

    A lookup pins what it counts under the request id (``lookup_id``) until the request's
    retrieve or save, or an explicit ``unpin``, releases it; a repeated lookup for the same id
    first releases the earlier pins, so vLLM may ask as often as it likes.

    Args:
        engine: the worker's LMCacheEngine (``lookup(tokens, pin, lookup_id, request_configs)``
            and ``lookup_unpin(lookup_id)``).
        address: ZMQ endpoint to bind, e.g. from :func:`protocol.lookup_address`.

    Raises:
        RuntimeError: the endpoint is already served by a live process (two instances with the
            same ipc path, e.g. the same ``engine_id``), or cannot be bound; names the endpoint.
            A stale ipc file left by a dead process is replaced.
    """

    def __init__(self, engine, address: str):
        self._engine = engine
        self.address = address
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        check_endpoint_free(address)
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise RuntimeError(f"lookup endpoint {address} cannot be bound: {exc} (is another "
                               f"lmcache instance using it?)") from exc
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="lmcache-lookup-server", daemon=True)
        self._thread.start()

    def _handle(self, msg: dict) -> dict:
        op = msg.get("op")
        lookup_id = str(msg.get("id", ""))
        if op == "unpin":
            self._engine.lookup_unpin(lookup_id)
            return {"ok": True}
        if op == "lookup":
            tokens = torch.from_numpy(protocol.decode_tokens(msg["tokens"]).copy())
            tags = msg.get("tags") or None
            pin = bool(msg.get("pin", True))
            if pin:
                self._engine.lookup_unpin(lookup_id)
            hit = self._engine.lookup(tokens, pin=pin, lookup_id=lookup_id, request_configs=tags)
            return {"hit": int(hit)}
        raise ValueError(f"unknown lookup op {op!r}; expected 'lookup' or 'unpin'")

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            data = self._sock.recv()
            try:
                reply = self._handle(protocol.unpack(data))
            except Exception as exc:  # a bad request must not kill the server
                logger.warning("lookup request failed: %s", exc)
                reply = {"error": str(exc)}
            self._sock.send(protocol.pack(reply))

    def close(self) -> None:
        """Stop the serving thread and close the socket (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(0)


def check_endpoint_free(address: str) -> None:
    """RuntimeError when a live process listens on ``address``'s ipc path (ZMQ would silently
    take the path over, and the other instance's scheduler would ask this worker)."""
    if not address.startswith("ipc://") or address.startswith("ipc://@"):
        return
    path = address[len("ipc://"):]
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return  # a stale file of a process that is gone: bind replaces it
        raise RuntimeError(f"lookup endpoint {address} exists and cannot be checked: {exc}") from exc
    finally:
        probe.close()
    raise RuntimeError(
        f"lookup endpoint {address} is already served by a live process: two lmcache instances "
        f"share one ipc path (same vLLM engine_id and rank, or the same LMCACHE_IPC_DIR); give "
        f"each instance its own engine_id")
