"""TierStats: hit rate, bytes and latency of each storage tier (local_cpu, local_disk, remote).

The StorageManager records into one TierStats (its ``tier_stats``) where the tiers are called:

* **lookup** (:meth:`TierStats.lookup`, pinning lookups — the ones vLLM's scheduler makes):
  for each tier, the chunks that reached it (chunks not answered for by a faster tier; chunks
  past the hit prefix reach every tier) and the chunks it answered for. A tier's hit rate is
  ``lookup_hit_chunks / lookup_chunks``; the first tier's is the share of all chunks asked.
* **read** (:meth:`TierStats.read`, :meth:`TierStats.track_reads` for background prefetches):
  one request per tier call, the chunks and bytes (``MemoryObj.nbytes``) it delivered, and the
  call's wall time (a prefetch: from its start until its last chunk arrived).
* **write** (:meth:`TierStats.write`): one request per store's put call, the chunks and bytes
  handed to the tier and the call's wall time (write-backs of chunks read from a slower tier
  into the CPU tier are not counted). The disk and
  remote tiers write in the background: their write time is the time to queue the write, and a
  chunk they then drop (backlog, full disk, open breaker) is still counted here (their own
  ``stats`` count the drops).

Tier labels (:func:`tier_label`): LocalCPUBackend → ``local_cpu``, LocalDiskBackend →
``local_disk``, RemoteBackend → ``remote``, P2PBackend → ``p2p``; another name ``FooBackend``
→ ``foo``. The counts are exported by :class:`TierCollector` (the engine's LMCStatsMonitor
registers one) as ``lmcache_tier_<name>_total``, ``lmcache_tier_<read|write>_seconds`` and
``lmcache_tier_hit_rate``, labelled ``tier``; on vLLM's ``/metrics`` by
:mod:`lmcache.observability.vllm_metrics`. Thread-safe.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

COUNTERS = {
    "lookup_chunks": "Chunks pinning lookups asked of the tier (not held by a faster tier).",
    "lookup_hit_chunks": "Chunks the tier answered for in pinning lookups.",
    "read_requests": "Read calls to the tier (batched gets, single gets, prefetches).",
    "read_chunks": "Chunks the tier delivered.",
    "read_bytes": "Bytes of the chunks the tier delivered (KV payload).",
    "write_requests": "Put calls of stores to the tier (write-backs not counted).",
    "write_chunks": "Chunks handed to the tier's put.",
    "write_bytes": "Bytes of the chunks handed to the tier's put (KV payload).",
}
HISTOGRAMS = {
    "read_seconds": "Wall time of a read call to the tier (a prefetch: until its last chunk), seconds.",
    "write_seconds": "Wall time of a put call to the tier (queueing only for the disk and "
                     "remote tiers, which write in the background), seconds.",
}
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0)
_KNOWN = {"LocalCPUBackend": "local_cpu", "LocalDiskBackend": "local_disk",
          "RemoteBackend": "remote", "P2PBackend": "p2p"}
_MAX_PENDING = 4096  # observations kept per tier and histogram for take_observations()


def tier_label(backend_or_name) -> str:
    """The ``tier`` label of a backend (or of a backend ``name``), e.g. ``local_disk``."""
    name = str(getattr(backend_or_name, "name", backend_or_name))
    if name in _KNOWN:
        return _KNOWN[name]
    base = name.split()[0] if name.strip() else "unknown"
    base = base[:-len("Backend")] if base.endswith("Backend") and base != "Backend" else base
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", base).lower()


def _nbytes(objs: Iterable) -> tuple[int, int]:
    """(chunks, bytes) of the non-None objects."""
    got = [o for o in objs if o is not None]
    return len(got), sum(int(getattr(o, "nbytes", 0)) for o in got)


class TierStats:
    """Per-tier counters and latency histograms (see the module docstring).

    Args:
        tiers: backends (or labels) whose series exist from the start, at 0.
    """

    def __init__(self, tiers: Sequence = ()) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, float]] = {}
        self._hist: dict[str, dict[str, list]] = {}  # tier -> name -> [bucket counts, sum]
        self._pending: dict[str, dict[str, list[float]]] = {}
        for tier in tiers:
            self._tier(tier_label(tier))

    def _tier(self, tier: str) -> dict[str, float]:
        counts = self._counts.get(tier)
        if counts is None:
            counts = self._counts[tier] = dict.fromkeys(COUNTERS, 0.0)
            self._hist[tier] = {n: [[0] * (len(BUCKETS) + 1), 0.0] for n in HISTOGRAMS}
            self._pending[tier] = {n: [] for n in HISTOGRAMS}
        return counts

    # ---- recording ----------------------------------------------------------------------
    def add(self, backend, counts: dict[str, float], seconds: Optional[tuple[str, float]] = None
            ) -> None:
        """Add ``counts`` (names of COUNTERS) to the tier of ``backend`` and observe
        ``seconds = (histogram name, seconds)``. KeyError for an unknown name."""
        tier = tier_label(backend)
        bad = [n for n in counts if n not in COUNTERS]
        if bad or (seconds is not None and seconds[0] not in HISTOGRAMS):
            raise KeyError(f"unknown tier metric {bad or seconds[0]!r}; known: "
                           f"{sorted(COUNTERS)} and {sorted(HISTOGRAMS)}")
        with self._lock:
            mine = self._tier(tier)
            for name, amount in counts.items():
                mine[name] += amount
            if seconds is not None:
                name, value = seconds
                hist = self._hist[tier][name]
                hist[0][sum(value > b for b in BUCKETS)] += 1
                hist[1] += value
                if len(self._pending[tier][name]) < _MAX_PENDING:
                    self._pending[tier][name].append(float(value))

    def lookup(self, tiers: Sequence, owners: Sequence, num_chunks: int) -> None:
        """One lookup of ``num_chunks`` chunks over ``tiers`` (in order), whose hit prefix was
        answered for by ``owners`` (one tier per chunk of the prefix)."""
        missed = num_chunks - len(owners)
        order = {id(t): k for k, t in enumerate(tiers)}
        ranks = [order.get(id(o), len(tiers)) for o in owners]
        for k, tier in enumerate(tiers):
            hits = sum(r == k for r in ranks)
            reached = sum(r >= k for r in ranks) + missed
            self.add(tier, {"lookup_chunks": reached, "lookup_hit_chunks": hits})

    def read(self, backend, objs: Sequence, seconds: float) -> None:
        """One read call to ``backend`` that delivered ``objs`` (None = missed) in ``seconds``."""
        chunks, nbytes = _nbytes(objs)
        self.add(backend, {"read_requests": 1, "read_chunks": chunks, "read_bytes": nbytes},
                 ("read_seconds", seconds))

    def write(self, backend, objs: Sequence, seconds: float) -> None:
        """One put call handing ``objs`` to ``backend``, which took ``seconds``."""
        chunks, nbytes = _nbytes(objs)
        self.add(backend, {"write_requests": 1, "write_chunks": chunks, "write_bytes": nbytes},
                 ("write_seconds", seconds))

    def track_reads(self, backend, futures: Sequence[Future], started: float) -> None:
        """A background read of ``backend`` started at ``started`` (time.perf_counter()):
        recorded as one read when its last future is done (chunks: the futures whose result
        is an object)."""
        futures = list(futures)
        if not futures:
            self.read(backend, [], time.perf_counter() - started)
            return
        left = [len(futures)]
        lock = threading.Lock()

        def done(_: Future) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            objs = [f.result() for f in futures if not f.cancelled() and f.exception() is None]
            self.read(backend, objs, time.perf_counter() - started)

        for future in futures:
            future.add_done_callback(done)

    # ---- reading ------------------------------------------------------------------------
    def tiers(self) -> list[str]:
        """Labels of the tiers with series."""
        with self._lock:
            return list(self._counts)

    def value(self, tier: str, name: str) -> float:
        """A counter's total, or a histogram's observation count, of ``tier`` (0 if unseen)."""
        if name not in COUNTERS and name not in HISTOGRAMS:
            raise KeyError(f"unknown tier metric {name!r}")
        with self._lock:
            if tier not in self._counts:
                return 0.0
            if name in COUNTERS:
                return self._counts[tier][name]
            return float(sum(self._hist[tier][name][0]))

    def total_seconds(self, tier: str, name: str) -> float:
        """Sum of the observations of histogram ``name`` of ``tier`` (seconds)."""
        with self._lock:
            return self._hist[tier][name][1] if tier in self._hist else 0.0

    def hit_rate(self, tier: str) -> float:
        """``lookup_hit_chunks / lookup_chunks`` of ``tier`` (0.0 before any lookup)."""
        asked = self.value(tier, "lookup_chunks")
        return self.value(tier, "lookup_hit_chunks") / asked if asked else 0.0

    def snapshot(self) -> dict[str, dict[str, float]]:
        """``{tier: {counter: total}}``."""
        with self._lock:
            return {tier: dict(counts) for tier, counts in self._counts.items()}

    def take_observations(self) -> dict[str, dict[str, list[float]]]:
        """The observations (seconds) made since the last call, ``{tier: {histogram: [...]}}``
        (empty lists left out), and forget them (at most 4096 kept per tier and histogram)."""
        with self._lock:
            taken = self._pending
            self._pending = {tier: {n: [] for n in HISTOGRAMS} for tier in self._counts}
        return {tier: {n: v for n, v in hists.items() if v}
                for tier, hists in taken.items() if any(hists.values())}

    def histogram(self, tier: str, name: str) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``[(le, count), ..., ("+Inf", count)]`` and the sum, of one histogram."""
        with self._lock:
            counts, total = self._hist[tier][name]
            counts = list(counts)
        out, running = [], 0
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], counts):
            running += count
            out.append((bound, float(running)))
        return out, total


class TierCollector:
    """Prometheus collector of one TierStats, for a registry (the engine's LMCStatsMonitor).

    Args:
        stats: the TierStats.
        labels: constant labels (``model_name``, ``worker_id``); ``tier`` is added.
    """

    def __init__(self, stats: TierStats, labels: dict[str, str]) -> None:
        self.stats = stats
        self.names = [*labels, "tier"]
        self.values = list(labels.values())

    def describe(self):
        return []  # families are known only when collected (tiers appear as they are used)

    def collect(self):
        tiers = self.stats.tiers()
        for name, doc in COUNTERS.items():
            family = CounterMetricFamily(f"lmcache_tier_{name}", doc, labels=self.names)
            for tier in tiers:
                family.add_metric([*self.values, tier], self.stats.value(tier, name))
            yield family
        for name, doc in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"lmcache_tier_{name}", doc, labels=self.names)
            for tier in tiers:
                buckets, total = self.stats.histogram(tier, name)
                family.add_metric([*self.values, tier], buckets, total)
            yield family
        family = GaugeMetricFamily("lmcache_tier_hit_rate", "Chunks the tier answered for / "
                                   "chunks that reached it, in pinning lookups (0..1).",
                                   labels=self.names)
        for tier in tiers:
            family.add_metric([*self.values, tier], self.stats.hit_rate(tier))
        yield family
