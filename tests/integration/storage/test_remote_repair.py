"""Reliability of the remote connectors on real servers (issue 7):

* 7.1 an entry whose payload the server evicted (``maxmemory 8mb``, ``allkeys-lru``) is never
  counted, so the next store writes it again and the next retrieve gets every token; a chunk
  of another KV layout is a miss;
* 7.5 a connection dropped while idle (``CLIENT KILL``) or a server restart costs one retry on
  a fresh connection, not a window of misses;
* 7.9 a valid value stored under another key is a miss (Valkey keys and fs:// files).
"""

from __future__ import annotations

import shutil
import time

import pytest
import torch
import valkey

from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata
from lmcache.serde.naive import NaiveSerde
from lmcache.storage.backends.remote import RemoteBackend
from lmcache.storage.connectors.fs import FSConnector, file_name
from lmcache.storage.connectors.valkey import ValkeyConnector
from lmcache.storage.connectors.valkey_cluster import ValkeyClusterConnector
from storage_servers import ValkeyClusterProcesses, chunk_key, start_valkey

# ---- 7.1: the example through the engine: 4 chunks of 512 KiB, 64 tokens --------------
C, L, H, D, N, BLOCKS = 16, 2, 8, 512, 16, 8   # chunk = 2*L*C*H*D*2 bytes = 512 KiB (bf16)
DTYPE = torch.bfloat16
META = LMCacheMetadata("org/model", 1, 0, DTYPE, (L, 2, C, H, D))
LAYOUT = KVCacheLayout("cpu_packed", N, H, D)
TOKENS = torch.randint(0, 50000, (4 * C,), generator=torch.Generator().manual_seed(0))
SLOTS = torch.arange(N, N + 4 * C)


def cache(seed=None):
    shape = (BLOCKS, H, N, 2 * D)
    if seed is None:
        return [torch.full(shape, -3.0, dtype=DTYPE) for _ in range(L)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(DTYPE) for _ in range(L)]


def retrieved(engine) -> tuple[int, torch.Tensor]:
    dst = cache()
    ret = engine.retrieve(TOKENS, kvcaches=dst, slot_mapping=SLOTS)
    return int(ret.sum()), gather_kv(dst, SLOTS, LAYOUT)


def test_evicted_payload_is_not_promised_and_the_next_store_repairs_it(tmp_path):
    server = start_valkey(**{"maxmemory": "8mb", "maxmemory-policy": "allkeys-lru",
                             "maxmemory-samples": "64"})
    raw = valkey.Valkey(port=server.port)
    cfg = compose_config([f"chunk_size={C}", "max_local_cpu_size=0.02", "deployment=cpu_valkey",
                          f"remote_url=redis://127.0.0.1:{server.port}"])
    container = build_worker_container(cfg, META, LAYOUT)
    try:
        engine, tiers = container.engine(), container.backends()
        src = cache(1)
        want = gather_kv(src, SLOTS, LAYOUT)
        assert engine.store(TOKENS, kvcaches=src, slot_mapping=SLOTS) == 4 * C
        assert tiers[1].flush(timeout=60)
        keys = [k.decode() for k in raw.keys("*kv_bytes")]
        assert len(keys) == 4 and raw.dbsize() == 8
        time.sleep(1.5)  # Valkey's LRU clock has 1 s resolution
        victim = keys[1]
        for k in raw.keys("*"):  # touch every key except one chunk's payload
            if k.decode() != victim:
                raw.get(k)
        time.sleep(1.5)
        # Fill in 64 KiB steps until the server evicts that payload (the least recently used
        # key, 512 KiB), its metadata being kept.
        filled = 0
        while raw.exists(victim) and filled < 200:
            raw.set(f"filler{filled}", b"f" * (64 << 10))
            filled += 1
        assert raw.exists(victim) == 0
        assert raw.exists(victim.removesuffix("kv_bytes") + "metadata") == 1  # metadata kept
        raw.delete(*(f"filler{i}" for i in range(filled)))  # room again for the re-store
        tiers[0].clear()
        hit = engine.lookup(TOKENS)
        assert hit < 4 * C and hit % C == 0  # the evicted chunk is not promised
        assert retrieved(engine)[0] == hit  # retrieve delivers all it promised
        assert engine.store(TOKENS, kvcaches=src, slot_mapping=SLOTS) >= 0
        assert tiers[1].flush(timeout=60)
        assert raw.exists(victim) == 1  # written again
        tiers[0].clear()
        assert engine.lookup(TOKENS) == 4 * C
        n, got = retrieved(engine)
        assert n == 4 * C and torch.equal(got.view(torch.int16), want.view(torch.int16))
    finally:
        shutdown(container)
        raw.close()
        server.terminate()


def test_chunk_of_another_layout_with_the_same_byte_size_is_a_miss(valkey_server, cpu):
    url = f"redis://127.0.0.1:{valkey_server.port}"
    mine = LMCacheMetadata("meta-llama/Llama-3.1-8B", 1, 0, torch.bfloat16, (4, 2, 16, 4, 16))
    other = LMCacheMetadata("meta-llama/Llama-3.1-8B", 1, 0, torch.bfloat16, (4, 2, 16, 2, 32))
    writer = RemoteBackend(cpu, NaiveSerde(), ValkeyConnector(url), metadata=other)
    reader = RemoteBackend(cpu, NaiveSerde(), ValkeyConnector(url), metadata=mine)
    try:
        obj = cpu.allocate((2, 4, 16, 64), torch.bfloat16, MemoryFormat.KV_2LTD)
        obj.tensor.fill_(1.5)
        writer.put(chunk_key(0), obj)
        obj.ref_count_down()
        assert writer.flush(timeout=30)
        got = writer.get_blocking(chunk_key(0))
        assert got is not None and bool((got.tensor == 1.5).all())
        got.ref_count_down()
        assert reader.get_blocking(chunk_key(0)) is None  # heads 2 x 64 vs 4 x 16: a miss
        assert reader.stats["corrupt"] == 1
    finally:
        writer.close()
        reader.close()


# ---- 7.9: a valid value under another key is a miss ------------------------------------------
def _put(remote, cpu, i, value=2.0):
    obj = cpu.allocate((2, 4, 16, 64), torch.bfloat16, MemoryFormat.KV_2LTD)
    obj.tensor.fill_(value)
    remote.put(chunk_key(i), obj)
    obj.ref_count_down()
    assert remote.flush(timeout=30)


@pytest.mark.parametrize("scheme", ["redis", "valkey"])
def test_value_copied_to_another_key_in_valkey_is_a_miss(valkey_server, cpu, fetch, scheme):
    remote = RemoteBackend(cpu, NaiveSerde(),
                           ValkeyConnector(f"{scheme}://127.0.0.1:{valkey_server.port}"))
    raw = valkey.Valkey(port=valkey_server.port)
    try:
        _put(remote, cpu, 0)
        src, dst = chunk_key(0).to_string(), chunk_key(1).to_string()
        suffixes = ("kv_bytes", "metadata") if scheme == "redis" else ("", "lmc_meta")
        for s in suffixes:
            raw.copy(src + s, dst + s)
        assert remote.contains(chunk_key(1))
        assert fetch(remote, 1) is None and remote.stats["corrupt"] == 1
        assert fetch(remote, 0) is not None
    finally:
        remote.close()
        raw.close()


def test_file_copied_to_another_key_in_fs_is_a_miss(tmp_path, cpu, fetch):
    remote = RemoteBackend(cpu, NaiveSerde(), FSConnector(f"fs://{tmp_path}"))
    try:
        _put(remote, cpu, 0)
        shutil.copy(tmp_path / file_name(chunk_key(0).to_string()),
                    tmp_path / file_name(chunk_key(1).to_string()))
        assert remote.contains(chunk_key(1))
        assert fetch(remote, 1) is None and remote.stats["corrupt"] == 1
        assert fetch(remote, 0) is not None
    finally:
        remote.close()


# ---- 7.5: transient connection loss costs one retry, not an outage ----------------------------
@pytest.mark.parametrize("scheme", ["redis", "valkey"])
def test_connections_killed_while_idle_cost_one_retry(valkey_server, cpu, fetch, scheme):
    # retry_interval_secs=60: were the remote marked down, every call for a minute would miss
    conn = ValkeyConnector(f"{scheme}://127.0.0.1:{valkey_server.port}", retry_interval_secs=60)
    remote = RemoteBackend(cpu, NaiveSerde(), conn)
    admin = valkey.Valkey(port=valkey_server.port)
    try:
        _put(remote, cpu, 0)
        for _ in range(3):
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
            got = fetch(remote, 0)
            assert got is not None and bool((got == 2.0).all())
        admin.client_kill_filter(_type="normal", skipme=True)
        _put(remote, cpu, 1, 3.0)  # a put after the kill is not dropped either
        assert bool((fetch(remote, 1) == 3.0).all())
        # valkey-py's pool replaces a socket the server closed before using it; a call that
        # still meets a dead one reconnects once (reconnects) instead of opening an outage
        assert conn.stats["outages"] == 0 and conn.stats["failures"] == 0
        assert conn.stats["reconnects"] <= 4 and remote.stats["puts"] == 2
    finally:
        remote.close()
        admin.close()


def test_server_restart_on_the_same_port_costs_one_retry(cpu, fetch, tmp_path):
    server = start_valkey(data_dir=tmp_path / "v")
    port = server.port
    conn = ValkeyConnector(f"valkey://127.0.0.1:{port}", retry_interval_secs=60)
    remote = RemoteBackend(cpu, NaiveSerde(), conn)
    try:
        _put(remote, cpu, 0)
        server.terminate()
        server = start_valkey(port=port, data_dir=tmp_path / "v2")  # back, empty
        _put(remote, cpu, 1, 4.0)  # the first call after the restart reconnects and succeeds
        assert bool((fetch(remote, 1) == 4.0).all())
        assert fetch(remote, 0) is None  # restarted empty: a plain miss
        assert conn.stats["outages"] == 0 and conn.stats["failures"] == 0
        assert conn.stats["reconnects"] <= 1
    finally:
        remote.close()
        server.terminate()


def test_cluster_connections_killed_while_idle_cost_one_retry(tmp_path, cpu, fetch):
    cluster = ValkeyClusterProcesses(tmp_path).start()
    conn = ValkeyClusterConnector(cluster.url, retry_interval_secs=60)
    remote = RemoteBackend(cpu, NaiveSerde(), conn)
    try:
        for i in range(4):
            _put(remote, cpu, i, float(i))
        for port in cluster.ports:
            with valkey.Valkey(port=port) as admin:
                admin.client_kill_filter(_type="normal", skipme=True)
        for i in range(4):
            got = fetch(remote, i)
            assert got is not None and bool((got == float(i)).all())
        assert conn.stats["outages"] == 0 and conn.stats["failures"] == 0
    finally:
        remote.close()
        cluster.stop()
