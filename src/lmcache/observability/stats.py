"""LMCStatsMonitor: Prometheus counters and histograms of one LMCacheEngine.

Each monitor owns its own ``prometheus_client.CollectorRegistry`` (so several engines in one
process, and tests, never collide); serve it with e.g.
``prometheus_client.start_http_server(port, registry=monitor.registry)``. Metric names follow
LMCache's (``lmcache_`` prefix; counters are exported with Prometheus' ``_total`` suffix).
Every metric carries the labels ``model_name`` and ``worker_id``. Given the storage manager's
:class:`~lmcache.observability.tier_stats.TierStats`, the registry also holds the per-tier
series (``lmcache_tier_*``, label ``tier``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmcache.observability.tier_stats import TierCollector, TierStats

# name -> help text; units are tokens unless the name says otherwise.
COUNTERS = {
    "store_requests": "Number of store calls.",
    "store_requested_tokens": "Tokens offered to store (chunks after the store_mask prefix).",
    "stored_tokens": "Tokens newly written to the storage tiers.",
    "store_skipped_tokens": "Tokens not stored because their chunk was already cached.",
    "failed_stores": "Store calls that could not store every chunk (no memory).",
    "failed_store_tokens": "Tokens not stored because memory could not be allocated.",
    "retrieve_requests": "Number of retrieve calls.",
    "retrieve_requested_tokens": "Tokens asked for by retrieve (after the token_mask prefix).",
    "retrieve_hit_tokens": "Tokens really loaded into the KV cache by retrieve.",
    "lookup_requests": "Number of lookup calls.",
    "lookup_tokens": "Tokens asked about by lookup.",
    "lookup_hit_tokens": "Tokens lookup reported as cached (contiguous prefix).",
}
HISTOGRAMS = {
    "store_seconds": "Wall time of a store call, seconds.",
    "retrieve_seconds": "Wall time of a retrieve call, seconds.",
    "lookup_seconds": "Wall time of a lookup call, seconds.",
    "process_tokens_seconds": "Time spent cutting tokens into chunks and hashing them "
                              "(token database, in lookup, store and retrieve), seconds.",
}
GAUGES = {"pinned_lookups": "Lookups whose pinned chunks are not yet released."}
_MAX_PENDING = 4096  # observations kept per histogram for take_observations()
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LMCStatsMonitor:
    """Counters (tokens, requests), histograms (seconds) and a gauge for one engine.

    Args:
        model_name: label value ``model_name``.
        worker_id: label value ``worker_id``.
        tier_stats: the storage tiers' TierStats (``StorageManager.tier_stats``), exported
            through this registry too; None: no per-tier series.

    Attributes:
        registry: the monitor's own CollectorRegistry.
        tier_stats: the TierStats given, or None.
    """

    _live: "weakref.WeakSet[LMCStatsMonitor]" = weakref.WeakSet()
    _live_lock = threading.Lock()

    def __init__(self, model_name: str = "", worker_id: int = 0,
                 tier_stats: Optional[TierStats] = None) -> None:
        with LMCStatsMonitor._live_lock:
            LMCStatsMonitor._live.add(self)
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": str(model_name), "worker_id": str(worker_id)}
        names = list(self.labels)
        self._metrics: dict[str, object] = {}
        for kind, table in ((Counter, COUNTERS), (Gauge, GAUGES)):
            for name, doc in table.items():
                metric = kind(f"lmcache_{name}", doc, names, registry=self.registry)
                self._metrics[name] = metric.labels(**self.labels)
        for name, doc in HISTOGRAMS.items():
            metric = Histogram(
                f"lmcache_{name}", doc, names, registry=self.registry, buckets=_BUCKETS
            )
            self._metrics[name] = metric.labels(**self.labels)
        self._pending: dict[str, list[float]] = {name: [] for name in HISTOGRAMS}
        self._pending_lock = threading.Lock()
        if tier_stats is not None and not isinstance(tier_stats, TierStats):
            raise TypeError(f"tier_stats must be a TierStats, got {type(tier_stats).__name__}")
        self.tier_stats = tier_stats
        if tier_stats is not None:
            self.registry.register(TierCollector(tier_stats, self.labels))

    def inc(self, name: str, amount: float = 1) -> None:
        """Add ``amount`` (>= 0) to counter ``name`` (a key of COUNTERS). KeyError if unknown."""
        if amount:
            self._counter(name).inc(amount)

    def observe(self, name: str, seconds: float) -> None:
        """Record one observation in histogram ``name`` (a key of HISTOGRAMS)."""
        if name not in HISTOGRAMS:
            raise KeyError(f"unknown histogram {name!r}; known: {sorted(HISTOGRAMS)}")
        self._metrics[name].observe(seconds)
        with self._pending_lock:
            if len(self._pending[name]) < _MAX_PENDING:
                self._pending[name].append(float(seconds))

    def take_observations(self) -> dict[str, list[float]]:
        """The histogram observations (seconds) made since the last call, by histogram name,
        and forget them (at most 4096 are kept per histogram between calls; the histograms'
        own counts and sums are complete). Used to forward them to another process's
        Prometheus histograms (:mod:`lmcache.observability.vllm_metrics`)."""
        with self._pending_lock:
            taken, self._pending = self._pending, {name: [] for name in HISTOGRAMS}
        return taken

    def set_gauge(self, name: str, value: float) -> None:
        """Set gauge ``name`` (a key of GAUGES)."""
        if name not in GAUGES:
            raise KeyError(f"unknown gauge {name!r}; known: {sorted(GAUGES)}")
        self._metrics[name].set(value)

    def value(self, name: str) -> float:
        """Current value: a counter's total, a gauge's value, a histogram's sample count."""
        suffix = "_total" if name in COUNTERS else "_count" if name in HISTOGRAMS else ""
        if not suffix and name not in GAUGES:
            raise KeyError(f"unknown metric {name!r}")
        got = self.registry.get_sample_value(f"lmcache_{name}{suffix}", self.labels)
        return 0.0 if got is None else got

    def total(self, name: str) -> float:
        """Sum of the observations of histogram ``name`` (seconds)."""
        if name not in HISTOGRAMS:
            raise KeyError(f"unknown histogram {name!r}; known: {sorted(HISTOGRAMS)}")
        got = self.registry.get_sample_value(f"lmcache_{name}_sum", self.labels)
        return 0.0 if got is None else got

    @classmethod
    def live(cls) -> list["LMCStatsMonitor"]:
        """Every monitor of this process that is still referenced (one per engine)."""
        with cls._live_lock:
            return list(cls._live)

    @classmethod
    def process_totals(cls) -> dict[str, float]:
        """Counters' totals and histograms' sums (``<name>``) and sample counts
        (``<name>_count``), added over every live monitor of this process."""
        out: dict[str, float] = {}
        for mon in cls.live():
            for name in COUNTERS:
                out[name] = out.get(name, 0.0) + mon.value(name)
            for name in HISTOGRAMS:
                out[name] = out.get(name, 0.0) + mon.total(name)
                out[f"{name}_count"] = out.get(f"{name}_count", 0.0) + mon.value(name)
        return out

    def snapshot(self) -> dict[str, float]:
        """Every metric's :meth:`value`, by short name."""
        return {name: self.value(name) for name in (*COUNTERS, *HISTOGRAMS, *GAUGES)}

    def _counter(self, name: str):
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name!r}; known: {sorted(COUNTERS)}")
        return self._metrics[name]
