"""LookupServer: the worker side of the scheduler→worker lookup (ZMQ REP on an ipc:// endpoint)."""

from __future__ import annotations

import logging
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
    """

    def __init__(self, engine, address: str):
        self._engine = engine
        self.address = address
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)
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
