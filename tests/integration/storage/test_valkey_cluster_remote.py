"""The remote tier on a real three-node Valkey Cluster (slots assigned by the test)."""

from __future__ import annotations

import pytest
import torch
from valkey.cluster import ValkeyCluster

from lmcache.storage.connectors.valkey_cluster import ValkeyClusterConnector, parse_cluster_url
from storage_servers import ValkeyClusterProcesses, chunk_key, eventually


@pytest.fixture
def cluster(tmp_path):
    c = ValkeyClusterProcesses(tmp_path).start()
    yield c
    c.stop()


def test_chunks_shard_over_the_cluster(cluster, make_remote, put_chunks, fetch):
    remote = make_remote(ValkeyClusterConnector(cluster.url, blocking_timeout_secs=5))
    ref = put_chunks(remote, range(24))
    sizes = cluster.dbsizes()
    assert sum(sizes) == 48 and all(s > 0 for s in sizes)  # 2 keys per chunk, on every node
    assert remote.batched_contains([chunk_key(i) for i in range(30)]) == 24
    objs = remote.batched_get_blocking([chunk_key(i) for i in range(25)])
    assert objs[24] is None
    for i in range(24):
        assert torch.equal(objs[i].tensor, ref[i])
        objs[i].ref_count_down()
    raw = ValkeyCluster(host="127.0.0.1", port=cluster.ports[0])
    k = chunk_key(3).to_string()
    assert raw.get(k) == ref[3].view(torch.uint8).numpy().tobytes()  # LMCache's GLIDE layout
    assert len(raw.get(k + "lmc_meta")) == 56
    raw.close()
    assert remote.remove(chunk_key(3)) and fetch(remote, 3) is None


def test_redis_cluster_scheme_two_key_layout(cluster, make_remote, put_chunks, fetch):
    url = cluster.url.replace("valkey-cluster://", "redis-cluster://")
    remote = make_remote(ValkeyClusterConnector(url, blocking_timeout_secs=5))
    ref = put_chunks(remote, range(8))
    raw = ValkeyCluster(host="127.0.0.1", port=cluster.ports[0])
    k = chunk_key(3).to_string()
    assert raw.get(k + "kv_bytes") == ref[3].view(torch.uint8).numpy().tobytes()
    assert len(raw.get(k + "metadata")) == 56
    raw.delete(k + "kv_bytes")  # evicted payload: the chunk is not counted, its get a miss
    assert remote.batched_contains([chunk_key(i) for i in range(8)]) == 3
    assert not remote.contains(chunk_key(3)) and fetch(remote, 3) is None
    assert torch.equal(fetch(remote, 4), ref[4])
    raw.close()


def test_node_killed_and_restarted_empty(cluster, make_remote, put_chunks, fetch):
    remote = make_remote(ValkeyClusterConnector(cluster.url, blocking_timeout_secs=1,
                                                retry_interval_secs=0.1))
    ref = put_chunks(remote, range(24))
    cluster.kill_node(1)
    results = [fetch(remote, i) for i in range(24)]  # misses, never an exception
    assert all(r is None or torch.equal(r, ref[i]) for i, r in enumerate(results))
    put_chunks(remote, [40])  # dropped or stored, no exception
    cluster.start_node(1)  # same port and nodes.conf: rejoins with its slots, data lost
    cluster.wait_ok()
    assert eventually(lambda: sum(fetch(remote, i) is not None for i in range(24)) > 0)
    hits = [fetch(remote, i) for i in range(24)]
    lost = [i for i, h in enumerate(hits) if h is None]
    assert 0 < len(lost) < 24                      # only the restarted node's chunks are gone
    assert all(torch.equal(hits[i], ref[i]) for i in range(24) if i not in lost)
    again = put_chunks(remote, lost)
    assert all(torch.equal(fetch(remote, i), again[i]) for i in lost)


def test_cluster_down_at_start(tmp_path, make_remote, put_chunks, fetch):
    cluster = ValkeyClusterProcesses(tmp_path)
    remote = make_remote(ValkeyClusterConnector(cluster.url, blocking_timeout_secs=1,
                                                retry_interval_secs=0.1))
    put_chunks(remote, [0])
    assert fetch(remote, 0) is None and remote.batched_contains([chunk_key(0)]) == 0
    cluster.start()
    try:
        assert eventually(lambda: bool(put_chunks(remote, [1])) and remote.contains(chunk_key(1)))
        assert fetch(remote, 1) is not None and fetch(remote, 0) is None
    finally:
        cluster.stop()


def test_cluster_url_parsing():
    assert parse_cluster_url("valkey-cluster://u:p%40ss@h1:7000,[::1]:7001") == (
        [("h1", 7000), ("::1", 7001)], "u", "p@ss")
    assert parse_cluster_url("redis-cluster://h:1") == ([("h", 1)], None, None)
    with pytest.raises(ValueError, match="is not host:port"):
        parse_cluster_url("valkey-cluster://h1")
    with pytest.raises(ValueError, match="scheme must be one of"):
        parse_cluster_url("valkey://h1:1")
