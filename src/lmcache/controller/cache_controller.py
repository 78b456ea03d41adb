"""CacheController: the cluster-wide view of which instance holds which KV chunk.

Workers (:class:`lmcache.controller.lmcache_worker.LMCacheWorker`, one per vLLM worker) talk to
it over ZMQ (:mod:`lmcache.controller.protocol`):

* ``reply`` port (ROUTER; LMCache's ``controller_reply_url`` on the worker side): ``register``
  (the worker's command address, tiers and P2P address), ``heartbeat`` (answered
  ``registered: False`` when the controller does not know the worker, e.g. after a restart with
  the in-memory index: the worker then registers again and sends a full sync), ``deregister``,
  ``p2p_lookup`` (which other instance holds the longest prefix of these chunks in its CPU tier);
* ``pull`` port (PULL; ``controller_pull_url``): batched admit/evict events and full syncs.

A worker whose last heartbeat is older than ``lmcache_worker_timeout`` seconds is dropped with
every index entry of it. The operations of LMCache's controller API (:mod:`.http_api`):
:meth:`lookup` here; :meth:`clear`, :meth:`pin`, :meth:`move`, :meth:`health`,
:meth:`query_worker_info`, :meth:`query_instance` (sent to each worker of the instance) in
:mod:`.instance_operations`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
import torch
import zmq

from lmcache.controller.chunk_index import ChunkIndex, WorkerInfo
from lmcache.controller.instance_operations import InstanceOperations
from lmcache.controller.protocol import ProtocolError, decode, encode
from lmcache.token_database.base import TokenDatabase

logger = logging.getLogger(__name__)

CPU_TIER = "LocalCPUBackend"


class TokenError(ValueError):
    """Tokens the workers' token database cannot hash: not ints, or an id beyond int64."""


class CacheController(InstanceOperations):
    """Args:
        index: the chunk index option (``memory`` or ``valkey``).
        token_database: hashes tokens exactly as the workers do (same chunk_size,
            hash_algorithm, hash_seed), for :meth:`lookup`, :meth:`pin` and :meth:`move`.
        controller_host: address the ZMQ ports bind to.
        controller_monitor_ports: ``{"pull": port, "reply": port}`` (LMCache's key and
            defaults 8300 / 8400); port 0 picks a free one (see :attr:`pull_port`).
        lmcache_worker_timeout: seconds without a heartbeat after which a worker is dropped.
        command_timeout_secs: deadline of one command sent to a worker.
        p2p_locations: tiers a peer serves P2P pulls from (its CPU tier).

    Raises:
        ValueError: a bad port map or timeout.
    """

    def __init__(self, index: ChunkIndex, token_database: TokenDatabase,
                 controller_host: str = "0.0.0.0",
                 controller_monitor_ports: Optional[dict] = None,
                 lmcache_worker_timeout: float = 300.0, command_timeout_secs: float = 5.0,
                 p2p_locations: Sequence[str] = (CPU_TIER,)) -> None:
        ports = dict(controller_monitor_ports or {"pull": 8300, "reply": 8400})
        for name in ("pull", "reply"):
            p = ports.get(name)
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < 65536:
                raise ValueError(f"controller_monitor_ports[{name!r}] must be a port "
                                 f"(0..65535), got {p!r} in {ports!r}")
        for name, t in (("lmcache_worker_timeout", lmcache_worker_timeout),
                        ("command_timeout_secs", command_timeout_secs)):
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {t!r}")
        self.index = index
        self.token_database = token_database
        self.host = controller_host
        self.lmcache_worker_timeout = float(lmcache_worker_timeout)
        self.command_timeout_secs = float(command_timeout_secs)
        self.p2p_locations = frozenset(p2p_locations)
        self._ctx = zmq.Context()
        self._reply = self._ctx.socket(zmq.ROUTER)
        self._pull = self._ctx.socket(zmq.PULL)
        for sock in (self._reply, self._pull):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)
        self.reply_port = self._bind(self._reply, ports["reply"])
        self.pull_port = self._bind(self._pull, ports["pull"])
        self.stats = {"events": 0, "bad_messages": 0, "dropped_workers": 0, "index_errors": 0}
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="lmc-ctl-cmd")
        self._threads = [threading.Thread(target=f, name=n, daemon=True) for f, n in (
            (self._serve_replies, "lmc-ctl-reply"), (self._serve_pull, "lmc-ctl-pull"),
            (self._monitor, "lmc-ctl-monitor"))]
        for t in self._threads:
            t.start()
        logger.info("CacheController: reply port %d, pull port %d, worker timeout %.1f s",
                    self.reply_port, self.pull_port, self.lmcache_worker_timeout)

    def _bind(self, sock: zmq.Socket, port: int) -> int:
        if port == 0:
            return sock.bind_to_random_port(f"tcp://{self.host}")
        sock.bind(f"tcp://{self.host}:{port}")
        return port

    # ---- worker messages --------------------------------------------------------------
    def _serve_replies(self) -> None:
        poller = zmq.Poller()
        poller.register(self._reply, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                frames = self._reply.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            ident, body = frames[0], frames[-1]
            try:
                reply = self.handle_request(decode(body))
            except ProtocolError as e:
                self.stats["bad_messages"] += 1
                reply = {"error": str(e)}
            except Exception as e:  # noqa: BLE001 - an index failure is an error reply
                self.stats["index_errors"] += 1
                logger.warning("controller request failed: %s", e)
                reply = {"error": f"{type(e).__name__}: {e}"}
            try:
                self._reply.send_multipart([ident, b"", encode(reply)])
            except zmq.ZMQError:
                pass

    def _serve_pull(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                body = self._pull.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            try:
                self.handle_push(decode(body))
            except (ProtocolError, KeyError, TypeError, ValueError) as e:
                self.stats["bad_messages"] += 1
                logger.warning("dropped a malformed worker event: %s", e)
            except Exception as e:  # noqa: BLE001 - index down: events lost, counted
                self.stats["index_errors"] += 1
                logger.warning("worker event not applied: %s", e)

    def handle_request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Answer one worker request (``register``, ``heartbeat``, ``deregister``,
        ``p2p_lookup``); an unknown op or bad field → ``{"error": ...}``."""
        op, now = msg["op"], time.time()
        if op == "register":
            info = WorkerInfo.from_dict({**msg, "registration_time": now,
                                         "last_heartbeat_time": now})
            self.index.register(info)
            logger.info("registered %s worker %d at %s:%d (tiers %s, peer %s)", info.instance_id,
                        info.worker_id, info.ip, info.port, info.tiers, info.peer_init_url)
            return {"ok": True, "heartbeat_timeout": self.lmcache_worker_timeout,
                    "peers": self.peer_urls(info.instance_id, info.worker_id)}
        if op == "heartbeat":
            inst, wid = str(msg["instance_id"]), int(msg["worker_id"])
            return {"ok": True, "registered": self.index.heartbeat(inst, wid, now),
                    "peers": self.peer_urls(inst, wid)}
        if op == "deregister":
            n = self.index.remove_worker(str(msg["instance_id"]), int(msg["worker_id"]))
            return {"ok": True, "dropped_entries": n}
        if op == "p2p_lookup":
            return self.p2p_lookup(str(msg["instance_id"]), int(msg["worker_id"]),
                                   [int(h) for h in msg["hashes"]])
        return {"error": f"unknown op {op!r}"}

    def handle_push(self, msg: dict[str, Any]) -> None:
        """Apply one pushed message (``kv_ops`` or ``full_sync``)."""
        op = msg["op"]
        inst, wid, loc = str(msg["instance_id"]), int(msg["worker_id"]), str(msg["location"])
        if op == "kv_ops":
            ops = [(int(o), int(h)) for o, h in msg["ops"]]
            self.index.apply(inst, wid, loc, ops)
            self.stats["events"] += len(ops)
        elif op == "full_sync":
            self.index.replace(inst, wid, loc, [int(h) for h in msg["hashes"]])
        else:
            raise ValueError(f"unknown pushed op {op!r}")

    def _monitor(self) -> None:
        period = min(1.0, max(0.05, self.lmcache_worker_timeout / 5))
        while not self._stop.wait(period):
            try:
                self.drop_silent_workers(time.time())
            except Exception as e:  # noqa: BLE001 - index down: try again next period
                logger.warning("heartbeat check failed: %s", e)

    def drop_silent_workers(self, now: float) -> list[tuple[str, int]]:
        """Drop every worker whose last heartbeat is older than the timeout."""
        dropped = []
        for w in self.index.workers():
            if now - w.last_heartbeat_time > self.lmcache_worker_timeout:
                n = self.index.remove_worker(w.instance_id, w.worker_id)
                dropped.append((w.instance_id, w.worker_id))
                self.stats["dropped_workers"] += 1
                logger.warning("dropped %s worker %d: no heartbeat for %.1f s (%d index entries)",
                               w.instance_id, w.worker_id, now - w.last_heartbeat_time, n)
        return dropped

    # ---- lookups ----------------------------------------------------------------------
    def hashes(self, tokens) -> list[tuple[int, int]]:
        """``[(end, chunk_hash)]`` of the chunks of ``tokens`` (the workers' token database):
        a sequence of ints, or a 1-D int tensor or numpy array.

        Raises:
            TokenError: (a ValueError) tokens that are not ints, or an id beyond int64."""
        if isinstance(tokens, np.ndarray):  # (a copy: the array may be read-only)
            tokens = torch.from_numpy(np.array(tokens, copy=True))
        elif not isinstance(tokens, (list, torch.Tensor)):
            tokens = list(tokens)
        try:
            return [(end, h) for _, end, h in
                    self.token_database.process_tokens(tokens, make_key=False)]
        except ValueError as e:
            raise TokenError(f"{e} (token ids are int64)") from None

    def lookup(self, tokens: Sequence[int]) -> dict[str, tuple[str, int]]:
        """LMCache's lookup: ``{instance_id: (location, leading tokens held)}`` for every
        instance holding at least the first chunk. An instance holds a chunk when each of its
        registered workers holds it in some tier; ``location`` is the fastest tier (in the
        worker's tier order) holding the instance's last counted chunk.

        ``tokens``: a sequence of ints, or a 1-D int tensor / numpy array (an array skips the
        per-token conversion of a list). Raises TokenError (a ValueError): tokens that are not
        ints, or an id beyond int64."""
        chunks = self.hashes(tokens)
        hashes = [h for _, h in chunks]
        workers: dict[str, list[WorkerInfo]] = {}
        for w in self.index.workers():
            workers.setdefault(w.instance_id, []).append(w)
        held = self.index.held_prefixes(hashes)
        count = {inst: min(held.get((inst, w.worker_id), 0) for w in ws)
                 for inst, ws in workers.items()}
        count = {inst: n for inst, n in count.items() if n > 0}
        last = sorted({n - 1 for n in count.values()})
        at = dict(zip(last, self.index.holders([hashes[i] for i in last]))) if last else {}
        out: dict[str, tuple[str, int]] = {}
        for inst, n in count.items():
            tiers = workers[inst][0].tiers
            first = min(w.worker_id for w in workers[inst])
            locs = [loc for h_inst, wid, loc in at[n - 1] if h_inst == inst and wid == first]
            if locs:  # (else evicted since: not counted)
                best = min(locs, key=lambda t: tiers.index(t) if t in tiers else len(tiers))
                out[inst] = (best, chunks[n - 1][0])
        return out

    def peer_urls(self, instance_id: str, worker_id: int) -> list[str]:
        """``peer_init_url`` of every other instance's worker ``worker_id`` with a P2P address
        (sent with each register / heartbeat reply: a P2P tier says hello to new peers ahead
        of its first pull)."""
        return sorted(w.peer_init_url for w in self.index.workers()
                      if w.worker_id == worker_id and w.instance_id != instance_id
                      and w.peer_init_url)

    def p2p_lookup(self, instance_id: str, worker_id: int,
                   hashes: Sequence[int]) -> dict[str, Any]:
        """The peer (another instance's worker ``worker_id`` with a P2P address) holding the
        longest prefix of ``hashes`` in a P2P-servable tier: ``{"instance_id", "location",
        "num_hit_chunks", "peer_init_url"}`` (``num_hit_chunks`` 0 and empty strings: none)."""
        none = {"instance_id": "", "location": "", "num_hit_chunks": 0, "peer_init_url": ""}
        peers = {w.instance_id: w for w in self.index.workers()
                 if w.worker_id == worker_id and w.instance_id != instance_id and w.peer_init_url}
        if not peers or not hashes:
            return none
        held = self.index.held_prefixes(list(hashes), self.p2p_locations)
        counts = {inst: held.get((inst, worker_id), 0) for inst in peers}
        best = max(counts, key=lambda i: (counts[i], peers[i].last_heartbeat_time))
        if counts[best] == 0:
            return none
        return {"instance_id": best, "location": CPU_TIER, "num_hit_chunks": counts[best],
                "peer_init_url": peers[best].peer_init_url}

    def close(self) -> None:
        """Stop the threads, close the sockets and the index (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._reply.close()
        self._pull.close()
        self._ctx.term()
        self.index.close()
