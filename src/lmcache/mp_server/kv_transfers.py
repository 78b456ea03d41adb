"""KVTransfers: the MP server's STORE / RETRIEVE / CLEAR work, run in order on its transfer
thread (see :mod:`lmcache.mp_server.server` for the ordering and fault rules)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lmcache.mp_server.engine_pool import EnginePool
from lmcache.mp_server.gpu_cache_context import GPUCacheContext
from lmcache.mp_server.session_manager import SessionManager
from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey
from lmcache.v1.multiprocess.protocol import RequestType

logger = logging.getLogger(__name__)


class KVTransfers:
    """Copies KV between registered instances' caches and the engines' tiers.

    Args:
        pool: the engines.
        sessions: the instances (their KV caches) — read, never changed, here.
        event_timeout: seconds to wait for a client's CUDA event before answering False.
        counters: the server's counters (``unknown_instance`` is counted here).
    """

    def __init__(self, pool: EnginePool, sessions: SessionManager, event_timeout: float,
                 counters: dict) -> None:
        self.pool = pool
        self.sessions = sessions
        self.event_timeout = float(event_timeout)
        self.counters = counters
        self._streams: dict[int, Any] = {}

    def run(self, rtype: RequestType, payloads: list) -> list:
        """A STORE or RETRIEVE: ``[event_handle, bool]`` / ``[event_handle, [bool per key]]``.

        Every failure (unknown or dead instance, event timeout, a bad key, an engine error) is
        False for the keys concerned; the copy is complete when this returns.
        """
        keys, instance_id, block_ids, handle = payloads[:4]
        skips = payloads[4] if len(payloads) > 4 and payloads[4] is not None else [0] * len(keys)
        store = rtype is RequestType.STORE
        session = self.sessions.instance(int(instance_id))
        if session is None:
            self.counters["unknown_instance"] += 1
            logger.warning("lmcache MP server: %s from instance %s, which has no registered KV "
                           "cache (it died, or the server restarted since it registered): "
                           "answered False", rtype.name, instance_id)
            return [b"", False if store else [False] * len(keys)]
        ctx = session.ctx
        kv_caches = ctx.kv_caches  # held for the whole transfer, even if unregistered meanwhile
        t0 = time.perf_counter()
        waited = self._wait_event(handle, ctx, int(instance_id), session)
        t1 = time.perf_counter()
        self.counters["event_wait_seconds"] = self.counters.get("event_wait_seconds", 0.0) + t1 - t0
        if not waited or self.sessions.instance(int(instance_id)) is not session:
            return [b"", False if store else [False] * len(keys)]  # died or re-registered
        results, offset = [], 0
        stream = self._stream(ctx.device)
        for key, skip in zip(keys, skips):
            ok = False
            try:
                start, end = key.token_range()
                nblocks = -(-(end - start) // ctx.block_size)
                blocks = block_ids[offset:offset + nblocks]
                offset += nblocks
                ok = self._one(store, key, start, end, blocks, int(skip or 0), ctx, kv_caches,
                               stream)
            except Exception as e:  # noqa: BLE001 - this key is a miss, the others go on
                logger.warning("lmcache MP server: %s of request %s failed: %s", rtype.name,
                               key.request_id, e)
            results.append(ok)
        if stream is not None:
            stream.synchronize()
        name = "store_seconds" if store else "retrieve_seconds"
        self.counters[name] = self.counters.get(name, 0.0) + time.perf_counter() - t1
        return [b"", all(results) if store else results]

    def _one(self, store: bool, key: IPCCacheEngineKey, start: int, end: int, blocks: list,
             skip: int, ctx: GPUCacheContext, kv_caches: list, stream) -> bool:
        engine = self.pool.engine(key.model_name, key.world_size, key.worker_id or 0,
                                  ctx.layout, ctx.dtype, ctx.num_layers)
        tokens = key.token_tensor(end)
        mask = torch.zeros(end, dtype=torch.bool)
        mask[start:] = True
        slots = torch.full((end,), -1, dtype=torch.int64)
        slots[start:end] = ctx.slots(blocks, end - start)
        if skip:
            slots[start:start + skip] = -1
        kwargs = dict(kvcaches=kv_caches, slot_mapping=slots.to(ctx.device),
                      request_configs=key.request_configs())
        with _on_stream(stream):
            if store:
                engine.store(tokens, mask, **kwargs)  # no memory: a shorter prefix, counted
                return True
            ret = engine.retrieve(tokens, mask, lookup_id=key.request_id, **kwargs)
            return bool(ret[start:end].all())

    def clear(self) -> None:
        """Drop every stored chunk (one storage manager for all engines) and every pin."""
        for engine in self.pool.all_engines():
            engine.clear()
        logger.info("lmcache MP server: cleared every tier")

    def _wait_event(self, handle: bytes, ctx: GPUCacheContext, instance_id: int, session) -> bool:
        if not handle:
            return True
        event = torch.cuda.Event.from_ipc_handle(ctx.device, handle)
        deadline = time.monotonic() + self.event_timeout
        while not event.query():
            if self.sessions.instance(instance_id) is not session:
                return False  # the instance died (or re-registered) while we waited
            if time.monotonic() > deadline:
                logger.warning("lmcache MP server: the client's CUDA event did not complete "
                               "within %.0f s; transfer answered False", self.event_timeout)
                return False
            time.sleep(0.0001)
        return True

    def _stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(index)
        return self._streams[index]


class _on_stream:
    def __init__(self, stream) -> None:
        self.ctx = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False
