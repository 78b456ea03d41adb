"""LookupClient: the scheduler side of the scheduler→worker lookup (ZMQ REQ)."""

from __future__ import annotations

import logging

import zmq

from lmcache.distributed.lookup import protocol

logger = logging.getLogger(__name__)


class LookupClient:
    """Asks every worker's LookupServer how many prompt tokens lmcache holds.

    With several workers (tensor parallelism) the answer is the minimum over the ranks, since
    every rank must load its shard. A worker that does not answer within ``timeout_ms`` counts
    as 0 hits (a cache miss, never an error into vLLM); its socket is rebuilt for the next call.

    Args:
        addresses: one ZMQ endpoint per worker rank.
        timeout_ms: per-request deadline in milliseconds (> 0).
    Raises:
        ValueError: no address, or a non-positive timeout.
    """

    def __init__(self, addresses: list[str], timeout_ms: int = 5000):
        if not addresses:
            raise ValueError("LookupClient needs at least one worker address, got none")
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be > 0, got {timeout_ms}")
        self._ctx = zmq.Context.instance()
        self._addresses = list(addresses)
        self._timeout_ms = int(timeout_ms)
        self._socks = [self._connect(a) for a in self._addresses]
        self.failures = 0

    def _connect(self, address: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, self._timeout_ms)
        sock.setsockopt(zmq.SNDTIMEO, self._timeout_ms)
        sock.connect(address)
        return sock

    def _ask(self, i: int, msg: dict) -> dict | None:
        try:
            self._socks[i].send(protocol.pack(msg))
            reply = protocol.unpack(self._socks[i].recv())
        except (zmq.ZMQError, ValueError) as exc:
            self.failures += 1
            logger.warning("lookup to %s failed (%s); counting a miss", self._addresses[i], exc)
            self._socks[i].close(0)
            self._socks[i] = self._connect(self._addresses[i])
            return None
        if "error" in reply:
            self.failures += 1
            logger.warning("lookup server %s answered an error: %s", self._addresses[i], reply["error"])
            return None
        return reply

    def lookup(self, tokens, lookup_id: str, request_configs: dict | None = None, pin: bool = True) -> int:
        """Number of leading tokens of ``tokens`` (list[int] or 1-D int tensor) held by every worker.

        Pins the counted chunks on each worker under ``lookup_id`` when ``pin`` is true.
        """
        msg = {"op": "lookup", "id": lookup_id, "tokens": protocol.encode_tokens(tokens),
               "pin": pin, "tags": dict(request_configs or {})}
        hits = []
        for i in range(len(self._socks)):
            reply = self._ask(i, msg)
            hits.append(0 if reply is None else int(reply["hit"]))
        hit = min(hits)
        if pin and hit < max(hits):
            # Ranks disagree: release what the richer ranks pinned beyond the common prefix.
            self.unpin(lookup_id)
            return 0
        return hit

    def unpin(self, lookup_id: str) -> None:
        """Release every pin taken under ``lookup_id`` on every worker (best effort)."""
        for i in range(len(self._socks)):
            self._ask(i, {"op": "unpin", "id": lookup_id})

    def close(self) -> None:
        """Close the sockets (idempotent)."""
        for s in self._socks:
            s.close(0)
        self._socks = []
