"""The MP server's tiers come from lmcache's Hydra tree: with
``storage/backends=[local_cpu,local_disk]`` the KV a vLLM instance stored survives a server
restart (the disk tier rebuilds its index from its files), and a new instance loads it exactly."""

from __future__ import annotations

import torch

from test_mp_faults import N, adapters, heartbeat, retrieve, store
from mp_server_proc import free_port, lookup, start_server, stop_server, wait_until


def test_disk_tier_keeps_kv_across_server_restart(tmp_path):
    port = free_port()
    url = f"tcp://localhost:{port}"
    tiers = ["storage/backends=[local_cpu,local_disk]", f"local_disk={tmp_path}",
             "max_local_disk_size=0.05", "max_local_cpu_size=0.05"]
    tokens = list(range(4000, 4512))                            # 2 chunks of 256
    kv = torch.randn(80, 1, N, 8, generator=torch.Generator().manual_seed(11))
    proc = start_server(port, tiers)
    try:
        w, s = adapters(url, "m-disk")
        w.register_kv_caches({"l0": kv})
        store(w, "a", tokens, list(range(1, 33)))
        assert lookup(s, "b", tokens) == 512
        s.end_session("b")
        w.shutdown()
        s.close()
        wait_until(lambda: len(list(tmp_path.rglob("*"))) >= 2, timeout=10)
    finally:
        assert stop_server(proc) == 0                          # SIGTERM: tiers closed, files kept
    proc = start_server(port, tiers)
    try:
        fresh = torch.zeros(80, 1, N, 8)
        w, s = adapters(url, "m-disk")
        w.register_kv_caches({"l0": fresh})
        wait_until(lambda: heartbeat(url)["instances"] == 1)
        assert lookup(s, "c", tokens) == 512
        assert retrieve(w, "c", tokens, list(range(40, 72))) == set()
        assert torch.equal(fresh[40:72], kv[1:33])
        w.shutdown()
        s.close()
    finally:
        assert stop_server(proc) == 0
