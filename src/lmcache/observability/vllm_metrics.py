"""lmcache's metrics on vLLM's ``/metrics``, through vLLM's KV-connector metrics interface.

vLLM's engine core (with lmcache's engine in its worker) and its API server (which serves
``/metrics``) are different processes, so lmcache's numbers travel the way vLLM's own connector
stats do (vllm/distributed/kv_transfer/kv_connector/v1/metrics.py, vLLM 0.32):

1. each step, the worker-side connector's ``get_kv_connector_stats()`` returns a
   :class:`LMCacheKVConnectorStats` built by :class:`ConnectorStatsSource`: the increase of the
   engine's counters since the last step and the histogram observations made since then
   (:meth:`lmcache.observability.stats.LMCStatsMonitor.take_observations`);
2. vLLM's scheduler aggregates them (:meth:`LMCacheKVConnectorStats.aggregate`) and ships them
   to the front end;
3. there, the connector class's ``build_prom_metrics()`` made a :class:`LMCachePromMetrics`,
   whose ``observe()`` adds them to Prometheus metrics with LMCache's names (LMCache 0.5.6
   lmcache/observability.py) and vLLM's labels (``model_name``, ``engine``).

Exported (counters get Prometheus' ``_total`` suffix): ``lmcache:num_retrieve_requests``,
``lmcache:num_store_requests``, ``lmcache:num_lookup_requests``, ``lmcache:num_requested_tokens``
(tokens asked of retrieve), ``lmcache:num_hit_tokens`` (tokens retrieve loaded),
``lmcache:num_stored_tokens``, ``lmcache:num_lookup_tokens``, ``lmcache:num_lookup_hits``
(tokens); gauges ``lmcache:retrieve_hit_rate`` and ``lmcache:lookup_hit_rate`` (hit tokens /
requested tokens since the start, 0..1); histograms (seconds) ``lmcache:time_to_retrieve``,
``lmcache:time_to_store``, ``lmcache:time_to_lookup``, ``lmcache:process_tokens_time`` (chunking
and hashing; LMCache splits it into retrieve_/store_process_tokens_time).

Per storage tier (:mod:`lmcache.observability.tier_stats`; vLLM's labels plus ``tier`` =
``local_cpu``, ``local_disk``, ``remote``): counters ``lmcache:num_tier_lookup_chunks`` (chunks
of pinning lookups that reached the tier), ``lmcache:num_tier_lookup_hits`` (chunks it answered
for), ``lmcache:num_tier_read_requests``, ``lmcache:num_tier_read_chunks``,
``lmcache:num_tier_read_bytes``, ``lmcache:num_tier_write_requests``,
``lmcache:num_tier_write_chunks``, ``lmcache:num_tier_write_bytes``; gauge
``lmcache:tier_hit_rate`` (lookup hits / lookup chunks since the start); histograms (seconds)
``lmcache:tier_time_to_get`` and ``lmcache:tier_time_to_put``. The remote tier's also under
LMCache's own names: ``lmcache:num_remote_read_requests``, ``lmcache:num_remote_read_bytes``,
``lmcache:num_remote_write_requests``, ``lmcache:num_remote_write_bytes`` and
``lmcache:remote_time_to_get`` (milliseconds, LMCache's buckets). (LMCache's
``lmcache:remote_time_to_put`` times the upload itself; lmcache's remote tier uploads in the
background, so its put time is only queueing and is not exported under that name.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                  KVConnectorStats)

# LMCache metric name -> (lmcache counter, help)
COUNTERS = {
    "lmcache:num_retrieve_requests": ("retrieve_requests", "Total number of retrieve requests sent to lmcache"),
    "lmcache:num_store_requests": ("store_requests", "Total number of store requests sent to lmcache"),
    "lmcache:num_lookup_requests": ("lookup_requests", "Total number of lookup requests sent to lmcache"),
    "lmcache:num_requested_tokens": ("retrieve_requested_tokens", "Total number of tokens requested from lmcache"),
    "lmcache:num_hit_tokens": ("retrieve_hit_tokens", "Total number of tokens hit in lmcache"),
    "lmcache:num_stored_tokens": ("stored_tokens", "Total number of tokens stored in lmcache including evicted ones"),
    "lmcache:num_lookup_tokens": ("lookup_tokens", "Total number of tokens requested in lookup from lmcache"),
    "lmcache:num_lookup_hits": ("lookup_hit_tokens", "Total number of tokens hit in lookup from lmcache"),
}
# LMCache metric name -> (lmcache histogram, help)
HISTOGRAMS = {
    "lmcache:time_to_retrieve": ("retrieve_seconds", "Time to retrieve from lmcache (seconds)"),
    "lmcache:time_to_store": ("store_seconds", "Time to store to lmcache (seconds)"),
    "lmcache:time_to_lookup": ("lookup_seconds", "Time to lookup in lmcache (seconds)"),
    "lmcache:process_tokens_time": ("process_tokens_seconds",
                                    "Time to chunk and hash tokens in lmcache (seconds)"),
}
# gauge -> (hit counter, requested counter, help)
HIT_RATES = {
    "lmcache:retrieve_hit_rate": ("retrieve_hit_tokens", "retrieve_requested_tokens",
                                  "Hit rate of lmcache retrieve requests (hit / requested tokens)"),
    "lmcache:lookup_hit_rate": ("lookup_hit_tokens", "lookup_tokens",
                                "Hit rate of lmcache lookup requests (hit / requested tokens)"),
}
TIME_BUCKETS = [0.00001 * 2**i for i in range(20)]  # 0.01 ms .. 5.2 s, as LMCache's lookup
# per tier: metric name -> (TierStats counter, help); label ``tier`` added to vLLM's labels
TIER_COUNTERS = {
    "lmcache:num_tier_lookup_chunks": ("lookup_chunks", "Chunks of pinning lookups that reached the tier"),
    "lmcache:num_tier_lookup_hits": ("lookup_hit_chunks", "Chunks the tier answered for in pinning lookups"),
    "lmcache:num_tier_read_requests": ("read_requests", "Read calls to the tier"),
    "lmcache:num_tier_read_chunks": ("read_chunks", "Chunks the tier delivered"),
    "lmcache:num_tier_read_bytes": ("read_bytes", "Bytes the tier delivered"),
    "lmcache:num_tier_write_requests": ("write_requests", "Put calls of stores to the tier"),
    "lmcache:num_tier_write_chunks": ("write_chunks", "Chunks handed to the tier by stores"),
    "lmcache:num_tier_write_bytes": ("write_bytes", "Bytes handed to the tier by stores"),
}
TIER_HISTOGRAMS = {
    "lmcache:tier_time_to_get": ("read_seconds", "Time of a read from the tier (seconds)"),
    "lmcache:tier_time_to_put": ("write_seconds", "Time of a put call to the tier; queueing "
                                 "only for the disk and remote tiers (seconds)"),
}
# LMCache's remote-tier names (no tier label): name -> (TierStats counter, help)
REMOTE_COUNTERS = {
    "lmcache:num_remote_read_requests": ("read_requests", "Total number of requests read from remote backends in lmcache"),
    "lmcache:num_remote_read_bytes": ("read_bytes", "Total number of bytes read from remote backends in lmcache"),
    "lmcache:num_remote_write_requests": ("write_requests", "Total number of requests write to remote backends in lmcache"),
    "lmcache:num_remote_write_bytes": ("write_bytes", "Total number of bytes write to remote backends in lmcache"),
}
REMOTE_MS_BUCKETS = [1, 5, 10, 20, 40, 60, 80, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000]


_PARTS = ("counters", "observations", "tiers", "tier_observations")


@dataclass
class LMCacheKVConnectorStats(KVConnectorStats):
    """lmcache's stats of one interval: ``data = {"counters": {name: increase},
    "observations": {histogram: [seconds, ...]}, "tiers": {tier: {name: increase}},
    "tier_observations": {tier: {histogram: [seconds, ...]}}}`` (names of LMCStatsMonitor and
    TierStats). Serializable."""

    def __post_init__(self) -> None:
        for part in _PARTS:
            self.data.setdefault(part, {})

    @classmethod
    def from_data(cls, data: dict[str, Any] | None) -> "LMCacheKVConnectorStats":
        """A copy of a received payload (vLLM also hands the same dict to the Prometheus
        side, so :meth:`aggregate` must never change it)."""
        data = data or {}
        return cls(data={"counters": dict(data.get("counters", {})),
                         "observations": {k: list(v) for k, v in
                                          data.get("observations", {}).items()},
                         "tiers": {t: dict(c) for t, c in data.get("tiers", {}).items()},
                         "tier_observations": {t: {k: list(v) for k, v in o.items()} for t, o
                                               in data.get("tier_observations", {}).items()}})

    def reset(self) -> None:
        self.data = {part: {} for part in _PARTS}

    def aggregate(self, other: KVConnectorStats) -> "LMCacheKVConnectorStats":
        """Add ``other``'s counters and append its observations (in place; returns self)."""
        theirs = other.data if other is not None else {}
        mine_c, mine_o = self.data["counters"], self.data["observations"]
        for name, value in theirs.get("counters", {}).items():
            mine_c[name] = mine_c.get(name, 0) + value
        for name, values in theirs.get("observations", {}).items():
            mine_o.setdefault(name, []).extend(values)
        for tier, counts in theirs.get("tiers", {}).items():
            mine = self.data["tiers"].setdefault(tier, {})
            for name, value in counts.items():
                mine[name] = mine.get(name, 0) + value
        for tier, hists in theirs.get("tier_observations", {}).items():
            mine = self.data["tier_observations"].setdefault(tier, {})
            for name, values in hists.items():
                mine.setdefault(name, []).extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        """Counters' increases and each histogram's observation count (for vLLM's log line)."""
        out: dict[str, int | float] = dict(self.data["counters"])
        out.update({f"{k}_count": len(v) for k, v in self.data["observations"].items()})
        for tier, counts in self.data["tiers"].items():
            out.update({f"{tier}.{k}": v for k, v in counts.items()})
        return out

    def is_empty(self) -> bool:
        return not any(self.data["counters"].values()) and not any(
            self.data["observations"].values()) and not any(
            any(c.values()) for c in self.data["tiers"].values()) and not any(
            any(o.values()) for o in self.data["tier_observations"].values())


class ConnectorStatsSource:
    """Worker side: turns one engine's LMCStatsMonitor into per-interval stats.

    Args:
        monitor: the engine's ``LMCStatsMonitor`` (``engine.stats``).
    """

    def __init__(self, monitor) -> None:
        self.monitor = monitor
        self._last = {name: 0.0 for name, _ in COUNTERS.values()}
        self._last_tiers: dict[str, dict[str, float]] = {}

    def collect(self) -> LMCacheKVConnectorStats | None:
        """Stats since the previous call; None when nothing happened."""
        counters = {}
        for name in self._last:
            now = self.monitor.value(name)
            if now != self._last[name]:
                counters[name] = now - self._last[name]
                self._last[name] = now
        tiers, tier_obs = {}, {}
        tier_stats = getattr(self.monitor, "tier_stats", None)
        if tier_stats is not None:
            for tier, now in tier_stats.snapshot().items():
                last = self._last_tiers.setdefault(tier, {})
                delta = {k: v - last.get(k, 0.0) for k, v in now.items() if v != last.get(k, 0.0)}
                last.update(now)
                if delta:
                    tiers[tier] = delta
            tier_obs = tier_stats.take_observations()
        stats = LMCacheKVConnectorStats(data={
            "counters": counters,
            "observations": {k: v for k, v in self.monitor.take_observations().items() if v},
            "tiers": tiers, "tier_observations": tier_obs})
        return None if stats.is_empty() else stats


class LMCachePromMetrics(KVConnectorPromMetrics):
    """Front-end side: LMCache-named Prometheus metrics, one labelled child per vLLM engine
    (vLLM passes ``labelnames`` and ``per_engine_labelvalues``: engine index -> label values)."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {n: self._per_engine(self._counter_cls(
            name=n, documentation=doc, labelnames=labelnames)) for n, (_, doc) in COUNTERS.items()}
        self._histograms = {n: self._per_engine(self._histogram_cls(
            name=n, documentation=doc, labelnames=labelnames, buckets=TIME_BUCKETS))
            for n, (_, doc) in HISTOGRAMS.items()}
        self._gauges = {n: self._per_engine(self._gauge_cls(
            name=n, documentation=doc, labelnames=labelnames, multiprocess_mode="mostrecent"))
            for n, (_, _, doc) in HIT_RATES.items()}
        self._totals: dict[int, dict[str, float]] = {i: {} for i in per_engine_labelvalues}
        tier_labels = [*labelnames, "tier"]
        self._tier_metrics = {n: self._counter_cls(name=n, documentation=doc, labelnames=tier_labels)
                              for n, (_, doc) in TIER_COUNTERS.items()}
        self._tier_metrics.update({n: self._histogram_cls(
            name=n, documentation=doc, labelnames=tier_labels, buckets=TIME_BUCKETS)
            for n, (_, doc) in TIER_HISTOGRAMS.items()})
        self._tier_hit_rate = self._gauge_cls(
            name="lmcache:tier_hit_rate", labelnames=tier_labels, multiprocess_mode="mostrecent",
            documentation="Hit rate of each lmcache storage tier in lookups (hits / chunks "
                          "that reached the tier)")
        self._remote = {n: self._per_engine(self._counter_cls(
            name=n, documentation=doc, labelnames=labelnames)) for n, (_, doc) in REMOTE_COUNTERS.items()}
        self._remote_get_ms = self._per_engine(self._histogram_cls(
            name="lmcache:remote_time_to_get", documentation="Time to get from remote backends (ms)",
            labelnames=labelnames, buckets=REMOTE_MS_BUCKETS))
        self._tier_totals: dict[tuple[int, str], dict[str, float]] = {}

    def _per_engine(self, metric) -> dict[int, Any]:
        return {i: metric.labels(*values) for i, values in self.per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        """Add one interval's stats (``LMCacheKVConnectorStats.data``) of engine ``engine_idx``."""
        counters = transfer_stats_data.get("counters", {})
        totals = self._totals.setdefault(engine_idx, {})
        for metric, (name, _) in COUNTERS.items():
            value = counters.get(name, 0)
            if value:
                self._counters[metric][engine_idx].inc(value)
                totals[name] = totals.get(name, 0.0) + value
        observations = transfer_stats_data.get("observations", {})
        for metric, (name, _) in HISTOGRAMS.items():
            for seconds in observations.get(name, ()):
                self._histograms[metric][engine_idx].observe(seconds)
        for metric, (hit, asked, _) in HIT_RATES.items():
            if totals.get(asked):
                self._gauges[metric][engine_idx].set(totals.get(hit, 0.0) / totals[asked])
        self._observe_tiers(transfer_stats_data, engine_idx)

    def _observe_tiers(self, data: dict[str, Any], engine_idx: int) -> None:
        values = list(self.per_engine_labelvalues.get(engine_idx, ()))
        for tier, counts in data.get("tiers", {}).items():
            totals = self._tier_totals.setdefault((engine_idx, tier), {})
            for metric, (name, _) in TIER_COUNTERS.items():
                self._tier_metrics[metric].labels(*values, tier).inc(counts.get(name, 0))
                totals[name] = totals.get(name, 0.0) + counts.get(name, 0)
            if totals.get("lookup_chunks"):
                self._tier_hit_rate.labels(*values, tier).set(
                    totals.get("lookup_hit_chunks", 0.0) / totals["lookup_chunks"])
            if tier == "remote":
                for metric, (name, _) in REMOTE_COUNTERS.items():
                    self._remote[metric][engine_idx].inc(counts.get(name, 0))
        for tier, hists in data.get("tier_observations", {}).items():
            for metric, (name, _) in TIER_HISTOGRAMS.items():
                for seconds in hists.get(name, ()):
                    self._tier_metrics[metric].labels(*values, tier).observe(seconds)
            if tier == "remote":
                for seconds in hists.get("read_seconds", ()):
                    self._remote_get_ms[engine_idx].observe(seconds * 1000.0)
