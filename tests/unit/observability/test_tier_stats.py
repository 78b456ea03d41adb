"""TierStats: tier labels, the lookup walk's per-tier counts, reads, writes, background reads,
and the Prometheus series of TierCollector in the engine's LMCStatsMonitor registry."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
from prometheus_client import generate_latest

from lmcache.observability.stats import LMCStatsMonitor
from lmcache.observability.tier_stats import TierStats, tier_label


class Obj:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_tier_labels():
    assert [tier_label(n) for n in ("LocalCPUBackend", "LocalDiskBackend", "RemoteBackend",
                                    "P2PBackend", "NixlStorageBackend", "weird")] == [
        "local_cpu", "local_disk", "remote", "p2p", "nixl_storage", "weird"]


def test_lookup_walk_reads_writes_and_exported_series():
    ts = TierStats(["LocalCPUBackend", "LocalDiskBackend", "RemoteBackend"])
    tiers = ["LocalCPUBackend", "LocalDiskBackend", "RemoteBackend"]
    # 6 chunks asked: 0-1 CPU, 2 disk, 3 remote, 4-5 nowhere
    ts.lookup(tiers, ["LocalCPUBackend"] * 2 + ["LocalDiskBackend", "RemoteBackend"], 6)
    assert [(ts.value(t, "lookup_chunks"), ts.value(t, "lookup_hit_chunks"))
            for t in ("local_cpu", "local_disk", "remote")] == [(6, 2), (4, 1), (3, 1)]
    assert ts.hit_rate("local_cpu") == pytest.approx(1 / 3) and ts.hit_rate("nope") == 0.0
    ts.read("LocalDiskBackend", [Obj(100), None, Obj(50)], 0.003)
    ts.write("RemoteBackend", [Obj(10)] * 4, 0.02)
    assert ts.value("local_disk", "read_chunks") == 2 and ts.value("local_disk", "read_bytes") == 150
    assert ts.value("remote", "write_bytes") == 40 and ts.value("remote", "write_seconds") == 1
    futures = [Future(), Future()]
    ts.track_reads("RemoteBackend", futures, 0.0)
    futures[0].set_result(Obj(7))
    assert ts.value("remote", "read_requests") == 0  # recorded when the last one is done
    futures[1].set_exception(OSError("gone"))
    assert [ts.value("remote", n) for n in ("read_requests", "read_chunks", "read_bytes")] == [1, 1, 7]
    assert ts.take_observations()["local_disk"] == {"read_seconds": [0.003]}
    assert ts.take_observations() == {}
    with pytest.raises(KeyError, match="unknown tier metric"):
        ts.add("LocalCPUBackend", {"reads": 1})

    mon = LMCStatsMonitor("org/m", 2, ts)
    text = generate_latest(mon.registry).decode()
    disk = 'model_name="org/m",tier="local_disk",worker_id="2"'
    assert f"lmcache_tier_read_bytes_total{{{disk}}} 150.0" in text
    assert f"lmcache_tier_hit_rate{{{disk}}} 0.25" in text
    assert f'lmcache_tier_read_seconds_bucket{{le="0.0025",{disk}}} 0.0' in text
    assert f'lmcache_tier_read_seconds_bucket{{le="0.005",{disk}}} 1.0' in text
    assert f"lmcache_tier_read_seconds_sum{{{disk}}} 0.003" in text
    with pytest.raises(TypeError, match="tier_stats must be a TierStats"):
        LMCStatsMonitor("m", 0, tier_stats={})
