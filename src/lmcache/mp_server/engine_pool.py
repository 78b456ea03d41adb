"""EnginePool: the MP server's LMCacheEngines, one per (model, world size, worker, KV layout),
all over ONE storage manager (one allocator, one set of tiers for every engine instance)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.metadata import LMCacheMetadata

logger = logging.getLogger(__name__)

EngineKey = tuple[str, int, int, KVCacheLayout, Any]


class EnginePool:
    """Builds and keeps the engines of the MP server.

    Engines are built on first use by ``engine_factory(metadata, layout, storage_manager)``
    → ``(engine, storage_manager, close)`` (the server passes
    ``containers.build_mp_engine`` bound to its composed config): the first engine builds the
    storage manager, later ones share it, so keys of every worker share tiers and capacity and a
    restarted vLLM instance finds the KV its predecessor stored.

    Args:
        engine_factory: builds one engine (above).
        chunk_size: tokens per chunk (the config's chunk_size).
    """

    def __init__(self, engine_factory: Callable, chunk_size: int) -> None:
        self._factory = engine_factory
        self.chunk_size = int(chunk_size)
        self._engines: dict[EngineKey, LMCacheEngine] = {}
        self._closers: list[Callable[[], None]] = []
        self._storage_manager: Optional[Any] = None
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
        engine, manager, close = self._factory(metadata, layout, self._storage_manager)
        self._storage_manager = manager
        self._closers.append(close)
        logger.info("lmcache MP server: engine for %s world_size=%d worker=%d (%s layout, "
                    "block %d, %s)", model_name, world_size, worker_id, layout.kind,
                    layout.block_size, dtype)
        return engine

    def close(self) -> None:
        """Close every engine; the storage manager's owner (the first) last. Idempotent."""
        with self._lock:
            closers, self._closers = self._closers, []
            self._engines.clear()
            self._storage_manager = None
        for close in reversed(closers):
            try:
                close()
            except Exception:  # noqa: BLE001 - shutdown goes on
                logger.exception("closing an MP server engine failed")
