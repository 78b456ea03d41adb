"""The lm:// remote against a real `python -m lmcache.server` process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.wire.metadata import encode_metadata
from lmcache.serde.wire.remote_metadata import RemoteMetadata
from lmcache.server import protocol
from lmcache.storage.connectors.lm import LMConnector
from storage_servers import LMServerProcess, chunk_key, eventually, free_port


def url(server) -> str:
    return f"lm://127.0.0.1:{server.port}"


def test_round_trip_exists_remove(lm_server, make_remote, put_chunks, fetch):
    remote = make_remote(LMConnector(url(lm_server), blocking_timeout_secs=5))
    ref = put_chunks(remote, range(5))
    assert remote.batched_contains([chunk_key(i) for i in (0, 1, 2, 9, 3)]) == 3
    objs = remote.batched_get_blocking([chunk_key(i) for i in range(5)])
    for i, obj in enumerate(objs):
        assert torch.equal(obj.tensor, ref[i])
        obj.ref_count_down()
    assert remote.remove(chunk_key(2)) and not remote.contains(chunk_key(2))
    assert not remote.connector.remove(chunk_key(2).to_string())


def test_raw_protocol_bytes(lm_server):
    """LMCache 0.5.6's headers, byte by byte: 186-byte request (9 int32 + 150-byte key padded
    with spaces), 36-byte reply (code, length, fmt, dtype, shape x4, location); PUT unanswered."""
    key = b"m@1@0@c0ffee@bfloat16"
    ints = lambda *v: b"".join(int(x).to_bytes(4, "little", signed=True) for x in v)  # noqa: E731
    with socket.create_connection(("127.0.0.1", lm_server.port), timeout=5) as s:
        # PUT 1: length 8, fmt KV_T2D 2, dtype bfloat16 3, location 0, shape (2, 2, 0, 0)
        s.sendall(ints(1, 8, 2, 3, 0, 2, 2, 0, 0) + key.ljust(150) + b"abcdefgh")
        s.sendall(ints(2, 0, 1, 2, 0, 0, 0, 0, 0) + key.ljust(150))          # GET 2
        assert bytes(protocol.recv_exact(s, 36)) == ints(200, 8, 2, 3, 2, 2, 0, 0, 0)
        assert protocol.recv_exact(s, 8) == b"abcdefgh"
        s.sendall(ints(3, 0, 1, 2, 0, 0, 0, 0, 0) + b"nope@1@0@1@half".ljust(150))  # EXIST 3
        assert bytes(protocol.recv_exact(s, 36)) == ints(400, 0, 1, 2, 0, 0, 0, 0, 0)
        s.sendall(ints(4, 0, 1, 2, 0, 0, 0, 0, 0) + key.ljust(150))          # LIST: no answer
        s.sendall(ints(5, 0, 1, 2, 0, 0, 0, 0, 0) + key.ljust(150))          # HEALTH 5
        assert bytes(protocol.recv_exact(s, 36)) == ints(200, 0, 1, 2, 0, 0, 0, 0, 0)
        s.sendall(ints(3, 0, 1, 2, 0, 0, 0, 0, 0) + key.ljust(150))
        assert bytes(protocol.recv_exact(s, 36))[:4] == ints(200)
        s.sendall((b"GARBAGE!" * 24)[:186])  # an unknown command closes this connection...
        assert s.recv(36) == b""
    with socket.create_connection(("127.0.0.1", lm_server.port), timeout=5) as s:
        s.sendall(protocol.pack_request(protocol.Command.HEALTH, b"lmcache-hello@1@0@0@half"))
        reply = protocol.unpack_reply(protocol.recv_exact(s, 36))   # ...and only this one
        assert (reply.code, reply.length, reply.location) == (200, protocol.EXT_MAGIC, 1)


def test_size_limits_on_both_sides(make_remote, put_chunks, fetch, cpu):
    server = LMServerProcess(None, "--max-value-mb", "0.01").start()  # 10 KiB per value
    try:
        remote = make_remote(LMConnector(url(server), blocking_timeout_secs=5))
        put_chunks(remote, [1])  # a 16 KiB chunk is refused (TOO_LARGE), nothing raised
        assert remote.stats["put_failures"] == 1 and not remote.contains(chunk_key(1))
        conn = remote.connector
        assert conn.put("small", encode_metadata(
            RemoteMetadata(4, MemoryFormat.BINARY, None, (4,)), b"abcd"), b"abcd")
        assert conn.get("small")[1] == b"abcd"  # the connection survived the refusal
    finally:
        server.kill()
    server = LMServerProcess().start()
    try:
        big = make_remote(LMConnector(url(server)))
        put_chunks(big, [2])
        small = make_remote(LMConnector(url(server), max_payload_bytes=1024))
        assert fetch(small, 2) is None  # the reply announces more than the client accepts
        assert fetch(big, 2) is not None
    finally:
        server.kill()


def test_server_evicts_least_recently_used(make_remote, put_chunks):
    server = LMServerProcess(None, "--max-size-gb", str(40_000 / (1 << 30))).start()
    try:
        remote = make_remote(LMConnector(url(server)))
        put_chunks(remote, [0, 1])          # two 16 KiB values fit in 40 000 bytes
        assert remote.contains(chunk_key(0))
        remote.get_blocking(chunk_key(0)).ref_count_down()  # 0 is now most recently used
        put_chunks(remote, [2])
        assert [remote.contains(chunk_key(i)) for i in range(3)] == [True, False, True]
    finally:
        server.kill()


def test_down_at_start_killed_restarted_empty_and_stalled(make_remote, put_chunks, fetch):
    port = free_port()
    remote = make_remote(LMConnector(f"lm://127.0.0.1:{port}", blocking_timeout_secs=0.5,
                                     retry_interval_secs=0.1), blocking_timeout_secs=0.5)
    put_chunks(remote, [0])
    assert fetch(remote, 0) is None and not remote.contains(chunk_key(0))
    server = LMServerProcess(port).start()
    try:
        assert eventually(lambda: bool(put_chunks(remote, [0])) and remote.contains(chunk_key(0)))
        ref = put_chunks(remote, [1])
        server.pause()  # stalled: answers nothing
        assert fetch(remote, 1) is None
        with open(f"/proc/{server.proc.pid}/stat") as f:
            assert f.read().split(") ")[1][0] == "T"
        server.resume()
        assert eventually(lambda: fetch(remote, 1) is not None)
        assert torch.equal(fetch(remote, 1), ref[1])
        server.kill()
        assert fetch(remote, 1) is None and remote.batched_contains([chunk_key(1)]) == 0
        server = LMServerProcess(port).start()  # back, empty
        assert eventually(lambda: bool(put_chunks(remote, [3])) and remote.contains(chunk_key(3)))
        assert fetch(remote, 1) is None and fetch(remote, 3) is not None
        assert remote.connector.stats["recoveries"] >= 2
    finally:
        server.kill()


def test_console_script_and_bad_urls():
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    exe = shutil.which("lmcache-server", path=search)
    assert exe is not None, "the lmcache-server console script is installed with the package"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--max-size-gb" in out.stdout
    bad = subprocess.run([exe, "127.0.0.1", "70000"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "port must be in 0..65535" in bad.stderr
    with pytest.raises(ValueError, match="lm://host:port"):
        LMConnector("lm://nohost")
    with pytest.raises(ValueError, match="lm://host:port"):
        LMConnector("valkey://h:1")


def test_server_restart_between_two_gets_costs_one_retry_not_an_outage(make_remote,
                                                                       put_chunks, fetch):
    """Issue 7 kind 5: the lm server restarts on the same port between two gets. With a 60 s
    retry interval, an outage would cost a minute of misses; the pooled socket the restart
    broke is noticed and replaced, so the next calls are served at once."""
    port = free_port()
    server = LMServerProcess(port).start()
    try:
        remote = make_remote(LMConnector(f"lm://127.0.0.1:{port}", retry_interval_secs=60,
                                         blocking_timeout_secs=5))
        ref = put_chunks(remote, [0])
        assert torch.equal(fetch(remote, 0), ref[0])
        server.kill()
        server = LMServerProcess(port).start()  # back, empty
        assert fetch(remote, 0) is None  # a miss (the data is gone), not an outage:
        ref = put_chunks(remote, [1])
        assert torch.equal(fetch(remote, 1), ref[1])
        assert remote.connector.stats["outages"] == 0 and remote.connector.is_available
    finally:
        server.kill()


def test_connection_dropped_while_idle_is_replaced(make_remote, put_chunks, fetch):
    """The server closes idle connections after 0.5 s; the next get reconnects at once."""
    server = LMServerProcess(None, "--idle-timeout-s", "0.5").start()
    try:
        remote = make_remote(LMConnector(url(server), retry_interval_secs=60,
                                         blocking_timeout_secs=5))
        ref = put_chunks(remote, [0, 1])
        for _ in range(2):
            time.sleep(1.0)  # every pooled socket is closed by the server meanwhile
            assert torch.equal(fetch(remote, 0), ref[0])
            assert remote.batched_contains([chunk_key(0), chunk_key(1)]) == 2
        assert remote.connector.stats["outages"] == 0
    finally:
        server.kill()


def test_retry_on_a_reused_socket_that_breaks_mid_request(lm_server):
    """A pooled socket that passes the staleness check but fails when used is retried once on
    a fresh connection (the server is stopped so that it cannot close the socket first)."""
    conn = LMConnector(url(lm_server), retry_interval_secs=60, blocking_timeout_secs=5)
    meta = encode_metadata(RemoteMetadata(4, MemoryFormat.BINARY, None, (4,)), b"abcd")
    assert conn.put("k@1@0@1@half", meta, b"abcd")
    pooled = conn._pool.get_nowait()
    lm_server.pause()
    pooled.sock.shutdown(socket.SHUT_WR)  # sending on it now fails (EPIPE)
    conn._pool.put_nowait(pooled)
    threading.Timer(0.3, lm_server.resume).start()
    assert bytes(conn.get("k@1@0@1@half")[1]) == b"abcd"
    assert conn.stats["reconnects"] == 1 and conn.stats["outages"] == 0
    conn.close()
