"""LookupClient: the scheduler side of the scheduler→worker lookup (ZMQ REQ)."""

from __future__ import annotations

import logging
import time

import zmq

from lmcache.distributed.lookup import protocol

logger = logging.getLogger(__name__)
MAX_TRIM_ROUNDS = 4  # re-asks to agree on a common prefix before giving up (→ 0)


class LookupClient:
    """Asks every worker's LookupServer how many prompt tokens lmcache holds.

    * All ranks are asked at once and answer within one deadline of ``timeout_ms``.
    * With several ranks (tensor parallelism) the answer is the **common prefix**: the minimum
      over the ranks, since every rank must load its shard. With ``pin`` the ranks that hold
      more are asked again for exactly that prefix (a repeated lookup under one id replaces
      its pins), so each rank pins the same chunks; should a rank then hold less (evicted
      meanwhile) the others are trimmed again, at most ``MAX_TRIM_ROUNDS`` times (then 0).
    * A rank that does not answer in time, or cannot be reached, costs a miss (0 tokens, never
      an error into vLLM) and is marked **down**: lookups answer 0 at once, without waiting,
      for ``retry_interval_ms`` (doubling on each failed re-probe up to ``max_retry_interval_ms``);
      the first lookup after that re-probes it. Its socket is rebuilt (a late answer is
      dropped). An ``{"error"}`` answer is a miss for that request only.

    Args:
        addresses: one ZMQ endpoint per worker rank.
        timeout_ms: deadline of one lookup (all ranks, trimming included), milliseconds, > 0.
        retry_interval_ms: first back-off of a rank that did not answer, milliseconds, > 0.
        max_retry_interval_ms: largest back-off, milliseconds, >= retry_interval_ms.

    Attributes:
        failures: requests a rank did not answer (timeout, unreachable) or answered an error.
        stats: ``failures``, ``marked_down`` (outages detected), ``skipped_down`` (lookups
            answered 0 at once because a rank is down), ``trims`` (re-asks for a common prefix).

    Raises:
        ValueError: no address, or a non-positive / inconsistent timeout.
    """

    def __init__(self, addresses: list[str], timeout_ms: int = 5000,
                 retry_interval_ms: int = 1000, max_retry_interval_ms: int = 30000):
        if not addresses:
            raise ValueError("LookupClient needs at least one worker address, got none")
        for name, value in (("timeout_ms", timeout_ms), ("retry_interval_ms", retry_interval_ms)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be an int > 0 (milliseconds), got {value!r}")
        if not isinstance(max_retry_interval_ms, int) or max_retry_interval_ms < retry_interval_ms:
            raise ValueError(f"max_retry_interval_ms must be an int >= retry_interval_ms "
                             f"({retry_interval_ms}), got {max_retry_interval_ms!r}")
        self._ctx = zmq.Context.instance()
        self._addresses = list(addresses)
        self._timeout_ms = int(timeout_ms)
        self._retry_s = retry_interval_ms / 1000
        self._max_retry_s = max_retry_interval_ms / 1000
        self._socks = [self._connect(a) for a in self._addresses]
        self._down_until = [0.0] * len(self._addresses)
        self._backoff = [0.0] * len(self._addresses)
        self.stats = dict.fromkeys(("failures", "marked_down", "skipped_down", "trims"), 0)

    @property
    def failures(self) -> int:
        return self.stats["failures"]

    def _connect(self, address: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        return sock

    # ---- one round: the same kind of request to several ranks, one deadline ---------------
    def _ask_all(self, msgs: dict[int, dict], deadline: float) -> dict[int, dict | None]:
        """Send ``msgs[rank]`` to each rank at once; the replies by ``deadline`` (None: none,
        or an error reply). A rank that did not answer is marked down."""
        replies: dict[int, dict | None] = {}
        waiting: dict[zmq.Socket, int] = {}
        for i, msg in msgs.items():
            try:
                self._socks[i].send(protocol.pack(msg), zmq.NOBLOCK)
                waiting[self._socks[i]] = i
            except zmq.ZMQError as exc:
                self._failed(i, f"send failed: {exc}")
                replies[i] = None
        poller = zmq.Poller()
        for sock in waiting:
            poller.register(sock, zmq.POLLIN)
        while waiting:
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0:
                break
            for sock, _ in poller.poll(left_ms):
                i = waiting.pop(sock)
                poller.unregister(sock)
                replies[i] = self._read(i, sock)
        for i in waiting.values():
            self._failed(i, f"no answer within {self._timeout_ms} ms")
            replies[i] = None
        return replies

    def _read(self, i: int, sock: zmq.Socket) -> dict | None:
        try:
            reply = protocol.unpack(sock.recv())
        except (zmq.ZMQError, ValueError) as exc:
            self._failed(i, f"bad answer: {exc}")
            return None
        self._up(i)
        if "error" in reply:
            self.stats["failures"] += 1
            logger.warning("lookup server %s answered an error: %s", self._addresses[i],
                           reply["error"])
            return None
        return reply

    def _failed(self, i: int, why: str) -> None:
        self.stats["failures"] += 1
        self._socks[i].close(0)
        self._socks[i] = self._connect(self._addresses[i])
        self._backoff[i] = min(self._max_retry_s, self._backoff[i] * 2 or self._retry_s)
        self._down_until[i] = time.monotonic() + self._backoff[i]
        if self._backoff[i] == self._retry_s:
            self.stats["marked_down"] += 1
            logger.warning("lookup server %s: %s; counting misses, re-probing after "
                           "%.1fs", self._addresses[i], why, self._backoff[i])

    def _up(self, i: int) -> None:
        if self._backoff[i]:
            logger.warning("lookup server %s answers again", self._addresses[i])
        self._backoff[i] = 0.0
        self._down_until[i] = 0.0

    # ---- public API --------------------------------------------------------------------------
    def lookup(self, tokens, lookup_id: str, request_configs: dict | None = None,
               pin: bool = True) -> int:
        """Number of leading tokens of ``tokens`` (list[int] or 1-D int tensor) held by every
        rank (their common prefix), within ``timeout_ms``; 0 when a rank is down or late.

        Pins exactly the counted chunks on each rank under ``lookup_id`` when ``pin`` is true.
        """
        now = time.monotonic()
        if any(until > now for until in self._down_until):
            self.stats["skipped_down"] += 1
            return 0
        deadline = now + self._timeout_ms / 1000
        encoded = protocol.encode_tokens(tokens)
        tags = dict(request_configs or {})

        def msg(n_tokens: int) -> dict:
            return {"op": "lookup", "id": lookup_id, "tokens": encoded[:8 * n_tokens],
                    "pin": pin, "tags": tags}

        full = len(encoded) // 8
        replies = self._ask_all({i: msg(full) for i in range(len(self._socks))}, deadline)
        hits = {i: (None if r is None else int(r["hit"])) for i, r in replies.items()}
        for _ in range(MAX_TRIM_ROUNDS):
            if any(h is None for h in hits.values()):
                break
            common = min(hits.values())
            richer = [i for i, h in hits.items() if h > common]
            if not pin or not richer:
                return common
            if common == 0:  # nothing to keep: release the richer ranks' pins
                self._ask_all({i: {"op": "unpin", "id": lookup_id} for i in richer}, deadline)
                return 0
            self.stats["trims"] += 1
            again = self._ask_all({i: msg(common) for i in richer}, deadline)
            for i, r in again.items():
                hits[i] = None if r is None else int(r["hit"])
        if pin:
            self.unpin(lookup_id)
        return 0

    def unpin(self, lookup_id: str) -> None:
        """Release every pin taken under ``lookup_id`` on every rank that is up (best effort,
        one deadline of ``timeout_ms``)."""
        now = time.monotonic()
        live = [i for i, until in enumerate(self._down_until) if until <= now]
        self._ask_all({i: {"op": "unpin", "id": lookup_id} for i in live},
                      now + self._timeout_ms / 1000)

    def close(self) -> None:
        """Close the sockets (idempotent)."""
        for s in self._socks:
            s.close(0)
        self._socks = []
