"""MPServer: lmcache in its own process, serving vLLM's ``LMCacheMPConnector`` over ZMQ.

One ROUTER socket (default ``tcp://localhost:5555``); protocol in
:mod:`lmcache.v1.multiprocess.protocol`. The loop thread answers the quick requests (chunk
size, lookup, heartbeats, sessions, registration); STORE/RETRIEVE/OFFLOAD run in order on one
transfer thread, on the server's own CUDA stream: before a copy the transfer thread waits
(host side, bounded by ``event_timeout``) for the CUDA event the client recorded, so a store
reads KV only after the forward pass wrote it and a retrieve overwrites blocks only after
earlier work on them finished; the copy is complete when the answer is sent (empty event
handle in the reply).

Faults: a request naming an instance the server does not know (never registered, died, or a
server restart since) answers False — the server never uses a handle it did not open itself
in this run, so a dead engine's freed memory is never read or written; instances and clients
found dead by :class:`SessionManager` have their KV mappings dropped and their lookup pins
released. Every store/retrieve error answers False (a miss), never wrong KV.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from typing import Any, Optional

import torch
import zmq

from lmcache.mp_server.engine_pool import EnginePool
from lmcache.mp_server.kv_transfers import KVTransfers
from lmcache.mp_server.gpu_cache_context import GPUCacheContext
from lmcache.mp_server.offload_server import OffloadServer
from lmcache.mp_server.session_manager import SessionManager
from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey
from lmcache.v1.multiprocess.protocol import RequestType, pack, unpack

logger = logging.getLogger(__name__)

_TRANSFERS = (RequestType.STORE, RequestType.RETRIEVE, RequestType.OFFLOAD, RequestType.CLEAR,
              RequestType.CB_STORE, RequestType.CB_RETRIEVE)


class MPServer:
    """The MP server (module docstring).

    Args:
        engine_pool: the engines (one storage manager for all).
        sessions: the SessionManager.
        url: ZMQ address to bind, e.g. ``"tcp://*:5555"``.
        event_timeout: seconds a transfer waits for the client's CUDA event before failing.
        reap_interval: seconds between liveness checks.
        blend: a BlendServer (``blend=cacheblend``) serving CB_STORE/CB_LOOKUP/CB_RETRIEVE;
            None refuses them.
    """

    def __init__(self, engine_pool: EnginePool, sessions: SessionManager,
                 url: str = "tcp://*:5555", event_timeout: float = 60.0,
                 reap_interval: float = 1.0, blend: Any = None) -> None:
        self.pool = engine_pool
        self.sessions = sessions
        self.offload = OffloadServer(engine_pool)
        self.url = url
        self.event_timeout = float(event_timeout)
        self.reap_interval = float(reap_interval)
        self.epoch = uuid.uuid4().hex  # changes with every server start: clients re-register
        # counts, and seconds the transfer thread spent waiting for client events / copying
        self.counters = {"requests": 0, "errors": 0, "reaped_instances": 0,
                         "released_requests": 0, "unknown_instance": 0,
                         "event_wait_seconds": 0.0, "store_seconds": 0.0, "retrieve_seconds": 0.0}
        self.transfers = KVTransfers(engine_pool, sessions, event_timeout, self.counters)
        self.blend = blend
        self.blend_transfers = None
        if blend is not None:
            from lmcache.mp_server.blend_transfers import BlendTransfers

            self.blend_transfers = BlendTransfers(blend, self.transfers)
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(url)
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._transfers: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # a full pipe already means "wake up"
        self._stop = threading.Event()
        self._handlers = {
            RequestType.GET_CHUNK_SIZE: lambda c, p: self.pool.chunk_size,
            RequestType.REGISTER_KV_CACHE: self._register,
            RequestType.UNREGISTER_KV_CACHE: self._unregister,
            RequestType.LOOKUP: self._lookup,
            RequestType.FREE_LOOKUP_LOCKS: self._free_lookup_locks,
            RequestType.END_SESSION: self._end_session,
            RequestType.HEARTBEAT: self._heartbeat,
            RequestType.REPORT_BLOCK_ALLOCATIONS: lambda c, p: None,
            RequestType.CB_LOOKUP: self._cb_lookup,
        }

    # ---- loop ----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; closes everything at the end."""
        worker = threading.Thread(target=self._transfer_loop, name="lmcache-mp-transfer",
                                  daemon=True)
        worker.start()
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_reap = time.monotonic() + self.reap_interval
        logger.info("lmcache MP server listening on %s (chunk_size %d, epoch %s)", self.url,
                    self.pool.chunk_size, self.epoch[:8])
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(int(self.reap_interval * 1000)))
                if self._wake_r in events:
                    os.read(self._wake_r, 65536)
                while self._socket.poll(0, zmq.POLLIN):
                    self._on_request(self._socket.recv_multipart())
                self._send_replies()
                if time.monotonic() >= next_reap:
                    self._reap()
                    next_reap = time.monotonic() + self.reap_interval
        finally:
            self._transfers.put(None)
            worker.join(timeout=30)
            self._socket.close(linger=0)
            self._ctx.term()
            self.pool.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (any thread, signal handlers too)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"s")
        except OSError:
            pass  # full (the loop wakes anyway) or closed (already stopped)

    def _on_request(self, frames: list[bytes]) -> None:
        self.counters["requests"] += 1
        if len(frames) != 3:
            logger.warning("lmcache MP server: malformed message of %d frames dropped", len(frames))
            return
        client, header, body = frames
        try:
            number, rtype = unpack(header)
            rtype = RequestType(rtype)
            payloads = unpack(body)
        except Exception as e:  # noqa: BLE001 - a bad request gets an error reply
            logger.warning("lmcache MP server: undecodable request: %s", e)
            self._reply(client, header and 0, False, f"undecodable request: {e}")
            return
        if rtype.name.startswith("CB_") and self.blend is None:
            self._reply(client, number, False, f"{rtype.name}: this MP server runs without "
                        "CacheBlend; start it with blend=cacheblend")
            return
        if rtype in _TRANSFERS:
            self._transfers.put((client, number, rtype, payloads))
            return
        try:
            self._reply(client, number, True, self._handlers[rtype](client, payloads))
        except Exception as e:  # noqa: BLE001 - errors go back to the client
            self.counters["errors"] += 1
            logger.warning("lmcache MP server: %s failed: %s", rtype.name, e)
            self._reply(client, number, False, f"{type(e).__name__}: {e}")

    def _reply(self, client: bytes, number: int, ok: bool, value: Any) -> None:
        self._replies.put((client, pack([number, ok, value])))
        if threading.current_thread() is not threading.main_thread():
            try:
                os.write(self._wake_w, b"r")
            except BlockingIOError:
                pass  # the pipe is full: the loop wakes anyway

    def _send_replies(self) -> None:
        while True:
            try:
                client, frame = self._replies.get_nowait()
            except queue.Empty:
                return
            self._socket.send_multipart([client, frame])

    # ---- quick requests -------------------------------------------------------------------
    def _register(self, client: bytes, payloads: list) -> None:
        instance_id, wrappers = payloads
        ctx = GPUCacheContext(int(instance_id), wrappers)
        old = self.sessions.register(int(instance_id), ctx)
        if old is not None:
            old.ctx.close()
        self.sessions.touch(client, int(instance_id))
        logger.info("lmcache MP server: instance %s registered %d layers %s (%s, block %d)%s",
                    instance_id, ctx.num_layers, tuple(ctx.kv_caches[0].shape), ctx.dtype,
                    ctx.block_size, " (replacing its earlier registration)" if old else "")

    def _unregister(self, client: bytes, payloads: list) -> None:
        old = self.sessions.unregister(int(payloads[0]))
        if old is not None:
            old.ctx.close()
            logger.info("lmcache MP server: instance %s unregistered", payloads[0])

    def _heartbeat(self, client: bytes, payloads: list) -> dict:
        instance_id = payloads[0] if payloads else None
        self.sessions.touch(client, instance_id, heartbeat=True)
        registered = instance_id is not None and self.sessions.instance(instance_id) is not None
        return {"epoch": self.epoch, "chunk_size": self.pool.chunk_size, "registered": registered,
                "instances": len(self.sessions.instances),
                "requests": len(self.sessions.requests), "counters": dict(self.counters),
                "pinned_lookups": int(sum(e.stats.value("pinned_lookups")
                                          for e in self.pool.all_engines())),
                "blend": self.blend.stats() if self.blend is not None else None}

    def _lookup(self, client: bytes, payloads: list) -> int:
        """Chunks of the key's tokens cached for EVERY worker (pinned for the request)."""
        self.sessions.touch(client)
        keys = payloads[0]
        if len(keys) != 1 or not keys[0].is_token_mode:
            raise ValueError(f"LOOKUP takes one token-mode key, got {len(keys)} key(s) "
                             f"{'(hash mode)' if keys and not keys[0].is_token_mode else ''}")
        key: IPCCacheEngineKey = keys[0]
        start, end = key.token_range()
        engines = self.pool.engines_of(key.model_name, key.world_size)
        if len(engines) < key.world_size:
            engines = self._engines_for_lookup(key)
            if engines is None:
                return 0  # no KV cache registered: nothing could be loaded
        tokens = key.token_tensor(end)
        hits, pinned = [], []
        for wid in range(key.world_size):
            best = 0
            for engine in engines[wid]:
                best = max(best, engine.lookup(tokens, pin=key.request_id is not None,
                                               lookup_id=key.request_id,
                                               request_configs=key.request_configs()))
                pinned.append(engine)
            hits.append(best)
        hit_tokens = min(hits)
        if key.request_id is not None:
            self.sessions.note_lookup(client, key.request_id, pinned, hit_tokens)
        return hit_tokens // self.pool.chunk_size

    def _engines_for_lookup(self, key: IPCCacheEngineKey) -> Optional[dict]:
        """Engines of every worker of ``key``, built from a registered instance's KV layout
        (a restarted server finds what its disk or remote tier kept before any store)."""
        instances = list(self.sessions.instances.values())
        if not instances:
            return None
        ctx = instances[0].ctx
        for wid in range(key.world_size):
            self.pool.engine(key.model_name, key.world_size, wid, ctx.layout, ctx.dtype,
                             ctx.num_layers)
        return self.pool.engines_of(key.model_name, key.world_size)

    def _cb_lookup(self, client: bytes, payloads: list) -> list:
        self.sessions.touch(client)
        key = payloads[0] if isinstance(payloads, list) and len(payloads) == 1 else None
        if not isinstance(key, IPCCacheEngineKey) or not key.is_token_mode:
            raise ValueError(f"CB_LOOKUP takes [one token-mode key], got {payloads!r:.200}")
        return self.blend.lookup(key)

    def _free_lookup_locks(self, client: bytes, payloads: list) -> None:
        """Release a request's lookup pins when the freed range covers what it counted (a
        retrieve of the rest releases them otherwise; the engines' lease bounds them)."""
        key = payloads[0]
        session = self.sessions.requests.get(key.request_id)
        if session is not None and key.token_range()[1] >= session.hit_tokens:
            for engine in session.engines:
                engine.lookup_unpin(key.request_id)
            session.engines.clear()

    def _end_session(self, client: bytes, payloads: list) -> None:
        self._release(self.sessions.end_request(str(payloads[0])), str(payloads[0]))
        if self.blend is not None:
            self.blend.unpin(str(payloads[0]))

    def _release(self, session, request_id: str) -> None:
        if session is None:
            return
        for engine in session.engines:
            engine.lookup_unpin(request_id)

    def _reap(self) -> None:
        dead, requests = self.sessions.reap()
        for instance_id in dead:
            self.counters["reaped_instances"] += 1
            logger.warning("lmcache MP server: instance %s is gone; its KV cache mappings are "
                           "dropped", instance_id)
        for req in requests:
            self.counters["released_requests"] += 1
            self._release(req, req.request_id)
        if dead:
            _ipc_collect()

    # ---- transfers -----------------------------------------------------------------------
    def _transfer_loop(self) -> None:
        while True:
            item = self._transfers.get()
            if item is None:
                return
            client, number, rtype, payloads = item
            try:
                if rtype is RequestType.OFFLOAD:
                    result: Any = self.offload.handle(payloads)
                elif rtype in (RequestType.CB_STORE, RequestType.CB_RETRIEVE):
                    result = self.blend_transfers.run(rtype, payloads)
                elif rtype is RequestType.CLEAR:
                    result = self.transfers.clear()
                else:
                    result = self.transfers.run(rtype, payloads)
                self._reply(client, number, True, result)
            except Exception as e:  # noqa: BLE001 - a failed transfer is a miss
                self.counters["errors"] += 1
                logger.warning("lmcache MP server: %s failed: %s", rtype.name, e)
                self._reply(client, number, False, f"{type(e).__name__}: {e}")



def _ipc_collect() -> None:
    if torch.cuda.is_available():
        torch.cuda.ipc_collect()
