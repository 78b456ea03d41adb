"""EnginePool: the MP server's LMCacheEngines, one per (model, world size, worker, KV layout),
all over ONE storage manager (one allocator, one set of tiers for every engine instance)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

from dependency_injector import providers

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.metadata import LMCacheMetadata

logger = logging.getLogger(__name__)

EngineKey = tuple[str, int, int, KVCacheLayout, Any]


class EnginePool:
    """Builds and keeps the engines of the MP server.

    Engines are built on first use by ``container_factory(metadata, layout)`` (the server
    passes ``containers.build_worker_container`` bound to its composed config). The first
    engine's container owns the storage manager; later engines get the same one through a
    provider override, so keys of every worker share tiers and capacity, and a restarted
    vLLM instance finds the KV its predecessor stored.

    Args:
        container_factory: ``(LMCacheMetadata, KVCacheLayout) -> WorkerContainer``.
        chunk_size: tokens per chunk (the config's chunk_size).
        close_container: closes a container (``containers.shutdown``).
    """

    def __init__(self, container_factory: Callable, chunk_size: int,
                 close_container: Callable) -> None:
        self._factory = container_factory
        self._close_container = close_container
        self.chunk_size = int(chunk_size)
        self._engines: dict[EngineKey, LMCacheEngine] = {}
        self._containers: list = []
        self._storage_manager = None
        self._lock = threading.Lock()

    def engine(self, model_name: str, world_size: int, worker_id: int, layout: KVCacheLayout,
               dtype, num_layers: int) -> LMCacheEngine:
        """The engine of one worker's KV (built on first use).

        Raises:
            ValueError: bad metadata (names the field) or a config the MP server cannot run.
        """
        key = (model_name, int(world_size), int(worker_id), layout, dtype)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._build(key, num_layers)
                self._engines[key] = engine
            return engine

    def engines_of(self, model_name: str, world_size: int) -> dict[int, list[LMCacheEngine]]:
        """worker_id → engines (one per KV layout seen) of ``model_name`` at ``world_size``."""
        out: dict[int, list[LMCacheEngine]] = {}
        with self._lock:
            for (model, ws, wid, _, _), engine in self._engines.items():
                if model == model_name and ws == int(world_size):
                    out.setdefault(wid, []).append(engine)
        return out

    def all_engines(self) -> list[LMCacheEngine]:
        with self._lock:
            return list(self._engines.values())

    def _build(self, key: EngineKey, num_layers: int) -> LMCacheEngine:
        model_name, world_size, worker_id, layout, dtype = key
        metadata = LMCacheMetadata(
            model_name=model_name, world_size=world_size, worker_id=worker_id, kv_dtype=dtype,
            kv_shape=(num_layers, 1 if layout.is_mla else 2, self.chunk_size,
                      layout.num_kv_heads, layout.head_size),
            use_mla=layout.is_mla)
        container = self._factory(metadata, layout)
        if self._storage_manager is not None:
            container.storage_manager.override(providers.Object(self._storage_manager))
        engine = container.engine()
        if self._storage_manager is None:
            self._storage_manager = container.storage_manager()
        self._containers.append(container)
        logger.info("lmcache MP server: engine for %s world_size=%d worker=%d (%s layout, "
                    "block %d, %s)", model_name, world_size, worker_id, layout.kind,
                    layout.block_size, dtype)
        return engine

    def storage_manager(self) -> Optional[Any]:
        return self._storage_manager

    def close(self) -> None:
        """Close every engine's container; the storage manager's owner last. Idempotent."""
        with self._lock:
            owned, self._containers = self._containers, []
            self._engines.clear()
        for container in reversed(owned[1:]):
            for name in ("gpu_connector",):
                provider = getattr(container, name)
                if provider.initialized:
                    obj = provider()
                    if callable(getattr(obj, "close", None)):
                        obj.close()
            container.shutdown_resources()
        if owned:
            self._close_container(owned[0])
        self._storage_manager = None
