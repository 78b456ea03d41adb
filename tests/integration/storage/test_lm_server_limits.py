"""The lm server bounds its resources (issue 7, kind 8), against the real server process:
in-flight byte budget, connection limit and idle/read timeouts, write backpressure, token,
and its own /metrics."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.wire.metadata import encode_metadata
from lmcache.serde.wire.remote_metadata import RemoteMetadata
from lmcache.server import protocol as p
from lmcache.server.__main__ import main as server_main
from lmcache.storage.connectors.lm import LMConnector
from storage_servers import eventually, free_port, wait_for_port

MiB = 1 << 20


class Server:
    """``python -m lmcache.server 127.0.0.1 PORT *flags``; stderr kept in a file."""

    def __init__(self, tmp: Path, *flags: str, host: str = "127.0.0.1",
                 nofile: Optional[int] = None, env: Optional[dict] = None) -> None:
        self.port = free_port()
        self.log = tmp / f"server-{self.port}.log"
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) \
            if nofile else None
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lmcache.server", host, str(self.port), *flags],
                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit, env=env)
        if self.proc.poll() is None:
            wait_for_port(self.port, self.proc)

    @property
    def url(self) -> str:
        return f"lm://127.0.0.1:{self.port}"

    def rss(self) -> int:
        """VmRSS of the server process, bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stderr(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def servers(tmp_path):
    made: list[Server] = []

    def start(*flags: str, **kw) -> Server:
        made.append(Server(tmp_path, *flags, **kw))
        return made[-1]

    yield start
    for s in made:
        s.kill()


def blob(n: int, seed: int = 0) -> tuple[bytes, bytes]:
    """(36-byte metadata, payload) of an n-byte raw value."""
    payload = bytes((seed + i) % 251 for i in range(256)) * (n // 256) + bytes(n % 256)
    meta = RemoteMetadata(n, MemoryFormat.BINARY, None, (n,))
    return encode_metadata(meta, payload), payload


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def closed_by_server(s: socket.socket, timeout: float = 10) -> bool:
    """True when the server closes ``s`` within ``timeout`` seconds (EOF or reset)."""
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(1 << 16):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def scrape(port: int) -> dict[str, float]:
    """The server's /metrics as {sample name with labels: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.decode().splitlines() if line and not line.startswith("#")}


def test_stalled_big_puts_stay_within_the_inflight_budget(servers):
    """12 clients each declare a 60 MiB PUT and stall: the server holds at most the 64 MiB
    budget (once grew by 12 x 60 MiB); a PUT that finds no budget is refused as BUSY, and the
    stalled clients are dropped at the read timeout, after which PUTs succeed again."""
    # read timeout 6 s > the 1 s sleep + the 2 s a PUT waits for budget: no race below
    server = servers("--max-inflight-mb", "64", "--max-value-mb", "60", "--read-timeout-s", "6")
    conn = LMConnector(server.url, blocking_timeout_secs=20, retry_interval_secs=0)
    meta, payload = blob(256 * 1024)
    assert conn.put("warm@1@0@1@half", meta, payload)
    base = server.rss()
    stalled = []
    for i in range(12):
        s = connect(server.port)
        cmd = p.Command.PUT if i % 2 else p.Command.X_PUT  # LMCache's and lmcache's PUT
        s.sendall(p.pack_request(cmd, f"big{i}@1@0@{i}@half".encode(), 60 * MiB, 4, 0,
                                 (60 * MiB, 0, 0, 0)) + bytes(MiB))
        stalled.append(s)
    time.sleep(1.0)
    grown = server.rss() - base
    assert grown < (64 + 16) * MiB, f"RSS grew {grown / MiB:.0f} MiB"
    meta8, payload8 = blob(8 * MiB)  # more than the 4 MiB of budget left
    assert conn.put("small@1@0@3@half", meta, payload)  # fits beside the stall
    assert not conn.put("late@1@0@2@half", meta8, payload8)  # BUSY: budget held by a stall
    assert conn.stats["failures"] == 1 and conn.is_available  # refused, not an outage
    assert all(closed_by_server(s) for s in stalled)  # read timeout: 6 s without bytes
    assert conn.put("late@1@0@2@half", meta8, payload8)
    assert bytes(conn.get("late@1@0@2@half")[1]) == payload8
    assert server.rss() - base < (64 + 16) * MiB
    for s in stalled:
        s.close()
    conn.close()


def test_idle_clients_are_dropped_and_the_limit_admits_new_clients(servers):
    """--max-connections 20, --idle-timeout-s 1: 30 idle clients never lock anyone out (the
    longest-idle one makes room), and each idle client is closed after 1 s; 20 clients stuck
    mid-request fill the limit, so a new one is refused at once until they time out."""
    server = servers("--max-connections", "20", "--idle-timeout-s", "1", "--read-timeout-s", "2")
    idle = [connect(server.port) for _ in range(30)]
    conn = LMConnector(server.url, blocking_timeout_secs=5, retry_interval_secs=0)
    meta, payload = blob(4096)
    assert conn.put("k@1@0@1@half", meta, payload)
    assert bytes(conn.get("k@1@0@1@half")[1]) == payload
    started = time.monotonic()
    assert all(closed_by_server(s, 5) for s in idle)
    assert time.monotonic() - started < 4
    conn.close()

    busy = [connect(server.port) for _ in range(20)]
    for s in busy:
        s.sendall(b"\x02")  # one byte of a request header: no longer idle
    time.sleep(0.3)
    refused = connect(server.port)
    assert closed_by_server(refused, 1)  # at the limit with no idle connection
    assert all(closed_by_server(s, 5) for s in busy)  # read timeout: 2 s
    conn = LMConnector(server.url, blocking_timeout_secs=5, retry_interval_secs=0)
    assert bytes(conn.get("k@1@0@1@half")[1]) == payload
    conn.close()
    for s in idle + busy + [refused]:
        s.close()


def test_300_idle_clients_under_a_256_fd_limit_lock_nobody_out(servers):
    """With RLIMIT_NOFILE 256 the connection limit is lowered to 240 (logged), and 300 idle
    clients still leave room for a real one."""
    server = servers("--idle-timeout-s", "600", nofile=256)
    idle = [connect(server.port) for _ in range(300)]
    conn = LMConnector(server.url, blocking_timeout_secs=5, retry_interval_secs=0)
    meta, payload = blob(4096)
    assert conn.put("k@1@0@1@half", meta, payload)
    assert bytes(conn.get("k@1@0@1@half")[1]) == payload
    assert "max_connections 256 lowered to 240: the open-file limit is 256" in server.stderr()
    conn.close()
    for s in idle:
        s.close()


def test_slow_readers_cost_no_copy_of_the_value(servers):
    """8 clients GET a 32 MiB value and never read: RSS grows by far less than 8 copies, other
    clients are served meanwhile, and the stuck writers are dropped at the read timeout."""
    metrics_port = free_port()
    server = servers("--read-timeout-s", "2", "--metrics-port", str(metrics_port))
    conn = LMConnector(server.url, blocking_timeout_secs=20, retry_interval_secs=0)
    meta, payload = blob(32 * MiB, seed=3)
    assert conn.put("v@1@0@1@half", meta, payload)
    base = server.rss()
    readers = []
    for _ in range(8):
        s = connect(server.port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(p.pack_request(p.Command.GET, b"v@1@0@1@half"))
        readers.append(s)
    time.sleep(0.5)
    assert server.rss() - base < 16 * MiB  # 8 copies would be 256 MiB
    assert bytes(conn.get("v@1@0@1@half")[1]) == payload
    dropped = 'lmcache_server_dropped_connections_total{reason="timeout"}'
    assert eventually(lambda: scrape(metrics_port).get(dropped) == 8, tries=100, delay=0.1)
    assert scrape(metrics_port)["lmcache_server_connections"] == 1  # only ``conn`` is left
    conn.close()
    for s in readers:
        s.close()


def test_token_required_wrong_or_missing_is_refused(servers, tmp_path, caplog):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-T0ken\n")
    server = servers("--token-file", str(token_file), "--read-timeout-s", "2")
    meta, payload = blob(4096)
    good = LMConnector(server.url, token_file=str(token_file), blocking_timeout_secs=5)
    assert good.put("k@1@0@1@half", meta, payload)
    assert bytes(good.get("k@1@0@1@half")[1]) == payload
    for token in ("wrong", None):
        bad = LMConnector(server.url, token=token, blocking_timeout_secs=5,
                          retry_interval_secs=0)
        with caplog.at_level("WARNING"):
            assert bad.get("k@1@0@1@half") is None
            assert not bad.put("k@1@0@1@half", meta, payload)
        assert "refused the token" in caplog.text
        bad.close()
    with connect(server.port) as s:  # an LMCache client (no HELLO) gets nothing
        s.sendall(p.pack_request(p.Command.GET, b"k@1@0@1@half"))
        assert closed_by_server(s, 5)
    with connect(server.port) as s:  # nor does a silent one, after the read timeout
        assert closed_by_server(s, 6)
    assert bytes(good.get("k@1@0@1@half")[1]) == payload
    good.close()
    with pytest.raises(ValueError, match="token must be"):
        LMConnector(server.url, token="has space")


def test_bind_warnings_and_bad_flags(servers, tmp_path, capsys):
    open_server = servers(host="0.0.0.0")
    assert eventually(lambda: "without a token" in open_server.stderr())
    token_file = tmp_path / "token"
    token_file.write_text("abc")
    guarded = servers("--token-file", str(token_file), host="0.0.0.0")
    assert eventually(lambda: "listening" in guarded.stderr())
    assert "without a token" not in guarded.stderr()
    token_file.write_text("not a token")
    for flags, message in [
        (("--token-file", str(token_file)), "token must be 1..100 characters"),
        (("--token-file", str(tmp_path / "missing")), "--token-file"),
        (("--max-value-mb", "100", "--max-inflight-mb", "50"), "must be <= --max-inflight-mb"),
        (("--max-connections", "0"), "--max-connections must be >= 1"),
        (("--metrics-port", "70000"), "metrics-port must be in 0..65535"),
        (("disk",), "invalid choice: 'disk'"),
    ]:
        with pytest.raises(SystemExit) as exited:
            server_main(["127.0.0.1", "0", *flags])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and message in err, (flags, err)


def test_metrics_endpoint(servers):
    metrics_port = free_port()
    server = servers("--metrics-port", str(metrics_port))
    conn = LMConnector(server.url, blocking_timeout_secs=5)
    meta, payload = blob(8192)
    assert conn.put("k@1@0@1@half", meta, payload)
    assert conn.get("k@1@0@1@half") is not None and conn.get("k@1@0@2@half") is None
    assert conn.batched_exists(["k@1@0@1@half", "k@1@0@3@half"]) == [True, False]
    values = scrape(metrics_port)
    assert values["lmcache_server_get_hits_total"] == 1
    assert values["lmcache_server_get_misses_total"] == 1
    assert values['lmcache_server_requests_total{command="X_PUT"}'] == 1
    assert values['lmcache_server_requests_total{command="EXIST"}'] == 2
    assert values["lmcache_server_stored_keys"] == 1
    assert values["lmcache_server_stored_bytes"] == 8192 + len(meta) - 28
    assert values["lmcache_server_connections"] == 1
    assert values["lmcache_server_inflight_bytes"] == 0
    conn.close()


def test_token_from_the_config(servers, tmp_path):
    """``remote_connector=lm`` with ``remote_connector.token_file`` (or ``.token``) reaches the
    connector that the container builds."""
    from lmcache.config.compose import compose_config
    from lmcache.containers import build

    token_file = tmp_path / "token"
    token_file.write_text("from-config\n")
    server = servers("--token-file", str(token_file))
    meta, payload = blob(4096)
    for override in (f"remote_connector.token_file={token_file}",
                     "remote_connector.token=from-config"):
        cfg = compose_config(["storage/backends=[local_cpu,remote]", "remote_connector=lm",
                              f"remote_url={server.url}", override])
        conn = build(cfg.remote_connector)
        assert isinstance(conn, LMConnector)
        assert conn.put("k@1@0@1@half", meta, payload)
        assert bytes(conn.get("k@1@0@1@half")[1]) == payload
        conn.close()
