"""The client side of LMCache's MP mode for vLLM's built-in ``LMCacheMPConnector``.

vLLM 0.32's connector (``vllm/distributed/kv_transfer/kv_connector/v1/lmcache_mp_connector.py``)
imports :class:`LMCacheMPSchedulerAdapter`, :class:`LMCacheMPWorkerAdapter`,
:class:`LoadStoreOp` and :class:`ParallelStrategy` from this module (LMCache's module name) and
builds them with ``mq_timeout`` and ``heartbeat_interval``; this module provides that API
(the connector calls ``free_lookup_locks``, ``report_block_allocations``,
``get_block_ids_with_load_errors`` and passes ``cache_salt(s)``). Protocol:
:mod:`lmcache.v1.multiprocess.protocol`; server: :mod:`lmcache.mp_server`.

Only token-mode keys are sent (the connector passes token ids). Without a server the adapters
run disconnected (:mod:`lmcache.v1.multiprocess.server_link`): 0 hits, stores skipped, and
they reconnect (the worker re-registering its KV caches) when the server answers again.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import zmq

from lmcache.utils import _lmcache_nvtx_annotate, init_logger
from lmcache.v1.multiprocess.custom_types import CudaIPCWrapper, IPCCacheEngineKey
from lmcache.v1.multiprocess.mq import MessageQueueClient, MessagingFuture
from lmcache.v1.multiprocess.protocol import RequestType
from lmcache.v1.multiprocess.server_link import ServerLink

logger = init_logger(__name__)


@dataclass
class ParallelStrategy:
    """How the KV is split over workers (fields and order as LMCache's)."""

    use_mla: bool
    kv_world_size: int
    kv_worker_id: int
    actual_world_size: int
    actual_worker_id: int
    tp_size: int
    pp_size: int


@dataclass
class LoadStoreOp:
    """One request's store/retrieve: its vLLM ``block_ids`` covering tokens ``[start, end)``
    of ``token_ids``; ``skip_first_n_tokens``: leading tokens a retrieve must not write
    (blocks vLLM's prefix cache shares with running requests)."""

    block_ids: list[int]
    token_ids: Optional[list[int]] = None
    block_hashes: Optional[list[bytes]] = None
    start: int = 0
    end: int = 0
    skip_first_n_tokens: int = 0

    def __len__(self) -> int:
        return len(self.block_ids)


def _event_handle(event: Any) -> bytes:
    """The CUDA IPC handle of ``event`` (b"" for None: the CPU stand-in has no events)."""
    return b"" if event is None else bytes(event.ipc_handle())


class _AdapterBase:
    def __init__(self, server_url: str, context: zmq.Context, model_name: str,
                 vllm_block_size: int, parallel_strategy: ParallelStrategy,
                 mq_timeout: float = 300.0, heartbeat_interval: float = 10.0,
                 instance_id: Optional[int] = None, role: str = "worker") -> None:
        self.mq_client = MessageQueueClient(server_url, context, timeout=mq_timeout)
        self.link = ServerLink(self.mq_client, instance_id, role, heartbeat_interval,
                               connect_timeout=min(float(mq_timeout), 5.0))
        self.model_name = model_name
        self.parallel_strategy = parallel_strategy
        self.vllm_block_size = vllm_block_size
        self.chunk_size = self.link.chunk_size
        if self.chunk_size % vllm_block_size:
            raise ValueError(f"LMCache chunk size {self.chunk_size} is not a multiple of vLLM's "
                             f"block size {vllm_block_size}")
        self.blocks_in_chunk = self.chunk_size // vllm_block_size

    @property
    def world_size(self) -> int:
        return self.parallel_strategy.kv_world_size

    @property
    def worker_id(self) -> int:
        return self.parallel_strategy.kv_worker_id

    @property
    def tp_size(self) -> int:
        return self.parallel_strategy.tp_size

    def num_blocks_per_chunk(self) -> int:
        """vLLM blocks per LMCache chunk."""
        return self.blocks_in_chunk

    def _key(self, token_ids, start: int, end: int, request_id: Optional[str],
             cache_salt: str = "", worker_id: Optional[int] = -1) -> IPCCacheEngineKey:
        return IPCCacheEngineKey(
            model_name=self.model_name, world_size=self.world_size,
            worker_id=self.worker_id if worker_id == -1 else worker_id,
            token_ids=tuple(token_ids), start=start, end=end,
            request_id=request_id, tp_size=self.tp_size, cache_salt=cache_salt or "")

    def _send(self, request_type: RequestType, payloads: list) -> Optional[MessagingFuture]:
        if not self.link.connected:
            return None
        return self.mq_client.submit_request(request_type, payloads)

    def close(self) -> None:
        self.link.close()
        self.mq_client.close()

    # CacheBlend (a blend=cacheblend server): see lmcache.v1.multiprocess.blend_client
    def cb_lookup(self, request_id: str, token_ids, cache_salt: str = "") -> list:
        """Cached segments of ``token_ids`` anywhere in it: ``[(start, end, stored_start)]``."""
        from lmcache.v1.multiprocess.blend_client import cb_lookup
        return cb_lookup(self, request_id, token_ids, cache_salt)

    def cb_store(self, token_ids, block_ids, event: Any = None, request_id: Optional[str] = None,
                 cache_salt: str = "") -> int:
        """Store the segments of ``token_ids`` (KV in ``block_ids``); segments newly stored."""
        from lmcache.v1.multiprocess.blend_client import cb_store
        return cb_store(self, token_ids, block_ids, event, request_id, cache_salt)

    def cb_retrieve(self, request_id: str, token_ids, block_ids, ranges, rope_parameters=None,
                    is_neox_style: bool = True, event: Any = None, cache_salt: str = "") -> list:
        """Load cached segments at ``ranges`` with K re-positioned; one bool per range."""
        from lmcache.v1.multiprocess.blend_client import cb_retrieve
        return cb_retrieve(self, request_id, token_ids, block_ids, ranges, rope_parameters,
                           is_neox_style, event, cache_salt)


class LMCacheMPSchedulerAdapter(_AdapterBase):
    """Scheduler side: lookups (which pin the hit chunks for the request), lock release,
    end of session, allocation reports."""

    def __init__(self, server_url: str, context: zmq.Context, model_name: str,
                 vllm_block_size: int, parallel_strategy: ParallelStrategy,
                 mq_timeout: float = 300.0, heartbeat_interval: float = 10.0) -> None:
        super().__init__(server_url, context, model_name, vllm_block_size, parallel_strategy,
                         mq_timeout, heartbeat_interval, instance_id=None, role="scheduler")
        self.lookup_futures: dict[str, MessagingFuture] = {}

    @_lmcache_nvtx_annotate
    def maybe_submit_lookup_request(self, request_id: str, block_hashes=None, token_ids=None,
                                    cache_salt: str = "") -> None:
        """Start a lookup of ``token_ids`` (chunk-aligned prefix) unless one is running.

        Raises:
            ValueError: block_hashes given (hash mode is not supported), or no token_ids.
        """
        if request_id in self.lookup_futures:
            return
        if block_hashes is not None or token_ids is None:
            raise ValueError("lmcache's MP adapter looks up token ids (token mode); got "
                             f"block_hashes={block_hashes is not None}, token_ids={token_ids is not None}")
        aligned = len(token_ids) // self.chunk_size * self.chunk_size
        if aligned == 0:
            return
        key = self._key(token_ids, 0, aligned, request_id, cache_salt, worker_id=None)
        self.lookup_futures[request_id] = (self._send(RequestType.LOOKUP, [[key]])
                                           or MessagingFuture.completed(0))

    @_lmcache_nvtx_annotate
    def check_lookup_result(self, request_id: str) -> Optional[int]:
        """Tokens hit (a multiple of chunk_size), None while the lookup runs, 0 when no lookup
        was needed (fewer tokens than a chunk)."""
        future = self.lookup_futures.get(request_id)
        if future is None:
            return 0
        if not future.query():
            return None
        try:
            return int(future.result()) * self.chunk_size
        except Exception as e:  # noqa: BLE001 - a refused lookup is a miss
            logger.warning("LMCache lookup of request %s failed: %s", request_id, e)
            return 0

    def cleanup_lookup_result(self, request_id: str) -> None:
        self.lookup_futures.pop(request_id, None)

    def free_lookup_locks(self, token_ids: list[int], start: int, end: int,
                          request_id: str) -> None:
        """Release the lookup pins of ``request_id`` on tokens ``[start, end)`` (the server
        releases them once the range covers every chunk the lookup counted)."""
        self._send(RequestType.FREE_LOOKUP_LOCKS,
                   [self._key(token_ids, start, end, request_id, worker_id=None)])

    def end_session(self, request_id: str) -> None:
        """The request finished: the server forgets it and releases what it still pins."""
        self.lookup_futures.pop(request_id, None)
        self._send(RequestType.END_SESSION, [request_id])

    def report_block_allocations(self, records: list) -> None:
        """Block allocation deltas (observability), sent without waiting."""
        self._send(RequestType.REPORT_BLOCK_ALLOCATIONS, [list(records)])


class LMCacheMPWorkerAdapter(_AdapterBase):
    """Worker side: KV cache registration (CUDA IPC) and asynchronous stores/retrieves."""

    def __init__(self, server_url: str, context: zmq.Context, model_name: str,
                 vllm_block_size: int, parallel_strategy: ParallelStrategy,
                 mq_timeout: float = 300.0, heartbeat_interval: float = 10.0) -> None:
        self.instance_id = os.getpid()
        self.kv_caches: dict[str, torch.Tensor] = {}
        self._wrapped: list[CudaIPCWrapper] = []
        self._registered_at = 0.0  # time.monotonic() when the last registration completed
        # held while a registration is in flight: a heartbeat answered "not registered" just
        # before it reached the server waits for it instead of registering a second time
        self._register_lock = threading.Lock()
        super().__init__(server_url, context, model_name, vllm_block_size, parallel_strategy,
                         mq_timeout, heartbeat_interval, instance_id=self.instance_id,
                         role="worker")
        self.link.on_connect = self._reregister
        self.store_futures: dict[str, tuple[MessagingFuture, list[str]]] = {}
        self.retrieve_futures: dict[str, tuple[MessagingFuture, list[str]]] = {}
        self._retrieve_blocks: dict[str, list[tuple[str, list[int]]]] = {}
        self.finished_stores: set[str] = set()
        self.previously_finished: set[str] = set()
        self._load_errors: set[int] = set()

    @property
    def use_mla(self) -> bool:
        return self.parallel_strategy.use_mla

    @property
    def is_first_rank_of_pp_group(self) -> bool:
        return self.parallel_strategy.actual_worker_id % self.parallel_strategy.tp_size == 0

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Share the KV caches (layer name → tensor, in layer order) with the server.
        Raises MPRequestError when the server refuses them (names why)."""
        with self._register_lock:
            self.kv_caches = dict(kv_caches)
            self._wrapped = [CudaIPCWrapper(t) for t in self.kv_caches.values()]
            logger.info("Registering %d KV cache layers with the LMCache MP server",
                        len(self._wrapped))
            future = self._send(RequestType.REGISTER_KV_CACHE, [self.instance_id, self._wrapped])
            if future is not None:
                future.result(self.link.connect_timeout + 30)
                self._registered_at = time.monotonic()

    def _reregister(self, reply: dict) -> None:
        with self._register_lock:  # (heartbeat thread) after any registration in flight
            if self._registered_at > self.link.last_beat_sent:
                return  # that heartbeat overtook our registration, which the server has by now
            if self._wrapped:
                self.mq_client.submit_request(RequestType.REGISTER_KV_CACHE,
                                              [self.instance_id, self._wrapped]).result(30)
                self._registered_at = time.monotonic()
                logger.warning("Re-registered %d KV cache layers with the LMCache MP server",
                               len(self._wrapped))

    def _submit(self, request_type: RequestType, request_ids, ops, event, cache_salts) -> MessagingFuture:
        keys, block_ids, skips = [], [], []
        salts = cache_salts or [""] * len(request_ids)
        for rid, op, salt in zip(request_ids, ops, salts):
            if op.token_ids is None:
                raise ValueError(f"request {rid}: lmcache's MP adapter needs token ids (token mode)")
            keys.append(self._key(op.token_ids, op.start, op.end, rid, salt))
            block_ids.extend(op.block_ids)
            skips.append(int(op.skip_first_n_tokens))
        payloads = [keys, self.instance_id, block_ids, _event_handle(event)]
        if request_type is RequestType.RETRIEVE:
            payloads.append(skips)
        raw = self._send(request_type, payloads)
        if raw is None:  # disconnected: store skipped, retrieve failed
            fail = [b"", True] if request_type is RequestType.STORE else [b"", [False] * len(keys)]
            raw = MessagingFuture.completed(fail)
        return raw.to_cuda_future()

    @_lmcache_nvtx_annotate
    def batched_submit_store_requests(self, request_ids: list[str], ops: list[LoadStoreOp],
                                      event: Any, cache_salts: Optional[list[str]] = None) -> None:
        """Store the ops' blocks once ``event`` (recorded after the forward pass) completed."""
        future = self._submit(RequestType.STORE, request_ids, ops, event, cache_salts)
        self.store_futures[request_ids[0]] = (future, list(request_ids[1:]))

    @_lmcache_nvtx_annotate
    def batched_submit_retrieve_requests(self, request_ids: list[str], ops: list[LoadStoreOp],
                                         event: Any, cache_salts: Optional[list[str]] = None) -> None:
        """Load the ops' blocks (after ``event``); failures show in
        :meth:`get_block_ids_with_load_errors`."""
        future = self._submit(RequestType.RETRIEVE, request_ids, ops, event, cache_salts)
        self.retrieve_futures[request_ids[0]] = (future, list(request_ids[1:]))
        n = self.vllm_block_size
        self._retrieve_blocks[request_ids[0]] = [
            (rid, op.block_ids[op.skip_first_n_tokens // n:]) for rid, op in zip(request_ids, ops)]

    def submit_store_request(self, request_id: str, op: LoadStoreOp, event: Any) -> None:
        self.batched_submit_store_requests([request_id], [op], event)

    def submit_retrieve_request(self, request_id: str, op: LoadStoreOp, event: Any) -> None:
        self.batched_submit_retrieve_requests([request_id], [op], event)

    @_lmcache_nvtx_annotate
    def get_finished(self, finished_req_ids_from_engine: set[str]
                     ) -> tuple[Optional[set[str]], Optional[set[str]]]:
        """(finished stores of requests vLLM already finished, finished retrieves)."""
        done_stores: set[str] = set()
        for rid, (future, others) in list(self.store_futures.items()):
            if future.query():
                del self.store_futures[rid]
                done_stores.add(rid)
                done_stores.update(others)
                if not self._ok(future, rid, "store"):
                    logger.warning("LMCache store of request %s failed", rid)
        done_retrieves: set[str] = set()
        for rid, (future, others) in list(self.retrieve_futures.items()):
            if future.query():
                del self.retrieve_futures[rid]
                done_retrieves.add(rid)
                done_retrieves.update(others)
                results = self._ok(future, rid, "retrieve")
                for i, (req, blocks) in enumerate(self._retrieve_blocks.pop(rid, [])):
                    if not (isinstance(results, list) and i < len(results) and results[i]):
                        self._load_errors.update(blocks)
                        logger.warning("LMCache retrieve of request %s failed; vLLM recomputes "
                                       "its %d blocks", req, len(blocks))
        self.finished_stores.update(done_stores)
        ret_stores = set()
        for rid in finished_req_ids_from_engine:
            if rid in self.finished_stores or rid in self.store_futures or any(
                    rid in others for _, others in self.store_futures.values()):
                self.previously_finished.add(rid)
            else:
                ret_stores.add(rid)
        safe = self.finished_stores & self.previously_finished
        self.finished_stores -= safe
        self.previously_finished -= safe
        return ret_stores | safe, done_retrieves

    def _ok(self, future: MessagingFuture, rid: str, what: str) -> Any:
        try:
            return future.result()
        except Exception as e:  # noqa: BLE001 - a refused transfer is a miss
            logger.warning("LMCache %s of request %s refused: %s", what, rid, e)
            return False

    def get_block_ids_with_load_errors(self) -> set[int]:
        """vLLM block ids whose retrieve failed since the last call (vLLM recomputes them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        """Unregister the KV caches (when the server is there) and close the client."""
        logger.info("Unregistering KV caches from the LMCache MP server")
        # heartbeats stop first: one answered after the unregister ("not registered") would
        # register the KV caches again, leaving the server a mapping of an engine that is gone
        self.link.close()
        future = self._send(RequestType.UNREGISTER_KV_CACHE, [self.instance_id])
        if future is not None:
            try:
                future.result(5)
            except Exception as e:  # noqa: BLE001 - the server may be gone already
                logger.warning("unregistering from the LMCache MP server failed: %s", e)
        self.close()
