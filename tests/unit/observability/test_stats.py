"""LMCStatsMonitor: per-monitor registries, names as exported, values readable."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from lmcache.observability.stats import COUNTERS, LMCStatsMonitor


def test_counters_gauges_histograms_and_isolation():
    a, b = LMCStatsMonitor("org/model", 1), LMCStatsMonitor("org/model", 1)
    a.inc("store_requests")
    a.inc("stored_tokens", 512)
    a.inc("failed_store_tokens", 0)
    a.observe("store_seconds", 0.003)
    a.observe("store_seconds", 0.2)
    a.set_gauge("pinned_lookups", 2)
    assert a.value("store_requests") == 1 and a.value("stored_tokens") == 512
    assert a.value("store_seconds") == 2 and a.value("pinned_lookups") == 2
    assert b.value("store_requests") == 0  # separate registries
    snap = a.snapshot()
    assert set(COUNTERS) <= set(snap) and snap["failed_store_tokens"] == 0
    text = generate_latest(a.registry).decode()
    assert 'lmcache_stored_tokens_total{model_name="org/model",worker_id="1"} 512.0' in text
    bucket = 'lmcache_store_seconds_bucket{le="0.005",model_name="org/model",worker_id="1"} 1.0'
    assert bucket in text


def test_unknown_names_raise_keyerror():
    m = LMCStatsMonitor()
    with pytest.raises(KeyError, match="unknown counter 'stores'"):
        m.inc("stores")
    with pytest.raises(KeyError, match="unknown histogram"):
        m.observe("store_requests", 1.0)
    with pytest.raises(KeyError, match="unknown metric 'nope'"):
        m.value("nope")
