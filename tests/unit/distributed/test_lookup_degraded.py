"""Issue 7.3: the scheduler's lookup degrades gracefully (real ZMQ IPC, container-built engines).

(a) TP ranks that hold different prefixes give the common prefix, pinned alike on every rank;
ranks are asked in parallel; a rank that cannot be reached is detected once (marked down, then
re-probed); two live instances on one ipc path are an error at start.
"""

import socket
import threading
import time

import pytest
import torch
import zmq

from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.distributed.lookup import protocol
from lmcache.distributed.lookup.client import LookupClient
from lmcache.distributed.lookup.server import LookupServer
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.metadata import LMCacheMetadata

C, L, H, D, N, BLOCKS = 256, 2, 2, 8, 16, 16


@pytest.fixture
def make_worker(tmp_path):
    made = []

    def make(rank: int, world: int = 2, engine_id: str = "tp"):
        meta = LMCacheMetadata("org/m", world, rank, torch.float32, (L, 2, C, H, D))
        container = build_worker_container(
            compose_config([f"chunk_size={C}", "max_local_cpu_size=0.02"]), meta,
            KVCacheLayout("cpu_packed", N, H, D))
        engine = container.engine()
        try:
            server = LookupServer(engine, protocol.lookup_address(engine_id, rank, str(tmp_path)))
        except Exception:
            shutdown(container)
            raise
        made.append((server, container))
        return engine, server

    yield make
    for server, container in made:
        server.close()
        shutdown(container)


def store(engine, tokens, seed=0):
    kv = [torch.randn(BLOCKS, H, N, 2 * D, generator=torch.Generator().manual_seed(seed + i))
          for i in range(L)]
    slots = torch.arange(tokens.numel()) % (BLOCKS * N)
    return engine.store(tokens, kvcaches=kv, slot_mapping=slots)


def evict_chunk(engine, tokens, index):
    keys = [k for _, _, k in engine.token_database.process_tokens(tokens)]
    assert engine.storage_manager.backends[0].remove(keys[index])


def test_tp_ranks_holding_different_prefixes_give_the_common_prefix(make_worker):
    (e0, s0), (e1, s1) = make_worker(0), make_worker(1)
    tokens = torch.arange(5000, 7048)  # 2048 tokens = 8 chunks
    assert store(e0, tokens) == 2048 and store(e1, tokens, seed=9) == 2048
    evict_chunk(e1, tokens, 3)  # rank 1 now holds 768 tokens as a prefix
    assert e0.lookup(tokens) == 2048 and e1.lookup(tokens) == 768
    client = LookupClient([s0.address, s1.address], timeout_ms=5000)
    assert client.lookup(tokens, "req") == 768
    assert client.stats["trims"] == 1 and client.failures == 0
    # both ranks pin exactly the 3 common chunks
    assert len(e0._lookup_pins["req"]) == 3 and len(e1._lookup_pins["req"]) == 3
    assert client.lookup(tokens, "req", pin=False) == 768
    client.unpin("req")
    assert e0.stats.value("pinned_lookups") == 0 and e1.stats.value("pinned_lookups") == 0
    evict_chunk(e0, tokens, 0)  # no common prefix left: nothing stays pinned anywhere
    assert client.lookup(tokens, "req2") == 0
    assert e0.stats.value("pinned_lookups") == 0 and e1.stats.value("pinned_lookups") == 0
    client.close()


class SilentRank:
    """A bound ZMQ REP socket that receives requests and never answers; records when."""

    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.received: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.sock.poll(10000):
            self.sock.recv()
            self.received.append(time.monotonic())

    def close(self) -> None:
        self._thread.join(timeout=15)
        self.sock.close(0)


def test_ranks_are_asked_in_parallel(tmp_path):
    ranks = [SilentRank(protocol.lookup_address("par", r, str(tmp_path))) for r in range(2)]
    client = LookupClient([r.sock.getsockopt_string(zmq.LAST_ENDPOINT) for r in ranks],
                          timeout_ms=1500)
    started = time.monotonic()
    assert client.lookup(list(range(10)), "r") == 0
    client.close()
    for r in ranks:
        r.close()
    # both got the request before the first rank's deadline ran out (asked at once)
    assert len(ranks[0].received) == 1 and len(ranks[1].received) == 1
    assert max(ranks[0].received + ranks[1].received) < started + 1.5
    assert client.stats["marked_down"] == 2


def test_unreachable_rank_is_detected_once_then_reprobed(make_worker, tmp_path):
    e0, s0 = make_worker(0)
    tokens = torch.arange(512)
    assert store(e0, tokens) == 512
    missing = protocol.lookup_address("tp", 1, str(tmp_path))
    client = LookupClient([s0.address, missing], timeout_ms=300, retry_interval_ms=400)
    assert client.lookup(tokens, "a") == 0
    assert client.failures == 1 and client.stats["marked_down"] == 1
    assert e0.stats.value("pinned_lookups") == 0  # rank 0's pins released
    for i in range(5):  # answered at once, nothing asked, nothing pinned
        assert client.lookup(tokens, f"b{i}") == 0
    assert client.failures == 1 and client.stats["skipped_down"] == 5
    e1, _ = make_worker(1)
    assert store(e1, tokens) == 512
    deadline = time.monotonic() + 10
    while client.lookup(tokens, "c") != 512 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.lookup(tokens, "c") == 512
    client.unpin("c")
    client.close()


def test_two_live_instances_on_one_endpoint_is_an_error(make_worker, tmp_path):
    _, server = make_worker(0, world=1, engine_id="same")
    with pytest.raises(RuntimeError, match="already served by a live process"):
        make_worker(0, world=1, engine_id="same")
    client = LookupClient([server.address])
    assert client.lookup([1, 2], "x", pin=False) == 0 and client.failures == 0  # still served
    client.close()


def test_a_stale_endpoint_file_is_replaced(make_worker, tmp_path):
    path = protocol.lookup_address("stale", 0, str(tmp_path))[len("ipc://"):]
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    engine, server = make_worker(0, world=1, engine_id="stale")
    assert store(engine, torch.arange(256)) == 256
    client = LookupClient([server.address])
    assert client.lookup(torch.arange(256), "x", pin=False) == 256
    client.close()
