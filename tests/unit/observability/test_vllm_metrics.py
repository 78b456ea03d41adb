"""lmcache's stats travel through vLLM's KV-connector metrics interface to LMCache-named
Prometheus metrics (worker source -> aggregate -> front-end metrics)."""

from __future__ import annotations

from functools import partial

import pytest

pytest.importorskip("vllm")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest  # noqa: E402

from lmcache.observability.stats import LMCStatsMonitor  # noqa: E402
from lmcache.observability.vllm_metrics import (ConnectorStatsSource, LMCacheKVConnectorStats,  # noqa: E402
                                                LMCachePromMetrics)


class _Cfg:
    kv_transfer_config = None


def test_source_aggregate_and_prometheus_names():
    mon = LMCStatsMonitor("m", 0)
    src = ConnectorStatsSource(mon)
    assert src.collect() is None  # nothing happened yet
    mon.inc("lookup_requests")
    mon.inc("lookup_tokens", 1024)
    mon.inc("lookup_hit_tokens", 768)
    mon.inc("retrieve_requests")
    mon.inc("retrieve_requested_tokens", 768)
    mon.inc("retrieve_hit_tokens", 512)
    mon.observe("retrieve_seconds", 0.004)
    mon.observe("lookup_seconds", 0.0002)
    first = src.collect()
    assert first.data["counters"] == {"lookup_requests": 1, "lookup_tokens": 1024,
                                      "lookup_hit_tokens": 768, "retrieve_requests": 1,
                                      "retrieve_requested_tokens": 768, "retrieve_hit_tokens": 512}
    assert first.data["observations"] == {"retrieve_seconds": [0.004], "lookup_seconds": [0.0002]}
    assert src.collect() is None  # deltas: nothing new
    mon.inc("retrieve_requests")
    mon.inc("retrieve_requested_tokens", 256)
    second = src.collect()
    merged = LMCacheKVConnectorStats(data={}).aggregate(first).aggregate(second)
    assert merged.data["counters"]["retrieve_requests"] == 2
    assert merged.data["counters"]["retrieve_requested_tokens"] == 1024
    assert merged.reduce()["retrieve_seconds_count"] == 1 and not merged.is_empty()
    assert LMCacheKVConnectorStats(data={}).is_empty()
    payload = first.to_dict()
    copy = LMCacheKVConnectorStats.from_data(payload).aggregate(second)
    assert copy.data["counters"]["retrieve_requests"] == 2
    assert payload["counters"]["retrieve_requests"] == 1  # the received payload is not changed

    reg = CollectorRegistry()
    types = {Counter: partial(Counter, registry=reg), Gauge: partial(Gauge, registry=reg),
             Histogram: partial(Histogram, registry=reg)}
    prom = LMCachePromMetrics(_Cfg(), types, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe(merged.data, 0)
    labels = {"model_name": "m", "engine": "0"}
    assert reg.get_sample_value("lmcache:num_hit_tokens_total", labels) == 512
    assert reg.get_sample_value("lmcache:num_requested_tokens_total", labels) == 1024
    assert reg.get_sample_value("lmcache:num_retrieve_requests_total", labels) == 2
    assert reg.get_sample_value("lmcache:num_lookup_hits_total", labels) == 768
    assert reg.get_sample_value("lmcache:retrieve_hit_rate", labels) == pytest.approx(0.5)
    assert reg.get_sample_value("lmcache:lookup_hit_rate", labels) == pytest.approx(0.75)
    assert reg.get_sample_value("lmcache:time_to_retrieve_count", labels) == 1
    assert reg.get_sample_value("lmcache:time_to_retrieve_sum", labels) == pytest.approx(0.004)
    text = generate_latest(reg).decode()
    assert 'lmcache:num_hit_tokens_total{engine="0",model_name="m"} 512.0' in text


def test_tier_stats_travel_to_tier_labelled_and_lmcache_remote_names():
    from lmcache.observability.tier_stats import TierStats

    class Obj:
        nbytes = 2048

    ts = TierStats(["LocalCPUBackend", "RemoteBackend"])
    mon = LMCStatsMonitor("m", 0, ts)
    src = ConnectorStatsSource(mon)
    ts.lookup(["LocalCPUBackend", "RemoteBackend"], ["LocalCPUBackend", "RemoteBackend"], 4)
    ts.read("RemoteBackend", [Obj(), None], 0.004)
    ts.write("RemoteBackend", [Obj(), Obj(), Obj()], 0.001)
    first = src.collect()
    assert first.data["tiers"] == {
        "local_cpu": {"lookup_chunks": 4, "lookup_hit_chunks": 1},
        "remote": {"lookup_chunks": 3, "lookup_hit_chunks": 1, "read_requests": 1,
                   "read_chunks": 1, "read_bytes": 2048, "write_requests": 1,
                   "write_chunks": 3, "write_bytes": 6144}}
    assert first.data["tier_observations"] == {"remote": {"read_seconds": [0.004],
                                                          "write_seconds": [0.001]}}
    assert src.collect() is None
    ts.read("RemoteBackend", [Obj()], 0.002)
    second = LMCacheKVConnectorStats.from_data(src.collect().to_dict())
    merged = LMCacheKVConnectorStats(data={}).aggregate(first).aggregate(second)
    assert merged.data["tiers"]["remote"]["read_bytes"] == 4096
    assert merged.reduce()["remote.read_requests"] == 2

    reg = CollectorRegistry()
    types = {Counter: partial(Counter, registry=reg), Gauge: partial(Gauge, registry=reg),
             Histogram: partial(Histogram, registry=reg)}
    prom = LMCachePromMetrics(_Cfg(), types, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe(merged.data, 0)
    cpu = {"model_name": "m", "engine": "0", "tier": "local_cpu"}
    remote = {**cpu, "tier": "remote"}
    assert reg.get_sample_value("lmcache:num_tier_lookup_hits_total", cpu) == 1
    assert reg.get_sample_value("lmcache:tier_hit_rate", cpu) == pytest.approx(0.25)
    assert reg.get_sample_value("lmcache:tier_hit_rate", remote) == pytest.approx(1 / 3)
    assert reg.get_sample_value("lmcache:num_tier_read_bytes_total", remote) == 4096
    assert reg.get_sample_value("lmcache:num_tier_read_bytes_total", cpu) == 0
    assert reg.get_sample_value("lmcache:tier_time_to_get_count", remote) == 2
    assert reg.get_sample_value("lmcache:tier_time_to_put_sum", remote) == pytest.approx(0.001)
    labels = {"model_name": "m", "engine": "0"}
    assert reg.get_sample_value("lmcache:num_remote_read_requests_total", labels) == 2
    assert reg.get_sample_value("lmcache:num_remote_read_bytes_total", labels) == 4096
    assert reg.get_sample_value("lmcache:num_remote_write_bytes_total", labels) == 6144
    assert reg.get_sample_value("lmcache:remote_time_to_get_sum", labels) == pytest.approx(6.0)
    assert reg.get_sample_value("lmcache:remote_time_to_get_bucket", {**labels, "le": "5.0"}) == 2
