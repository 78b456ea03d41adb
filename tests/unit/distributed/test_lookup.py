"""LookupClient ↔ LookupServer over real ZMQ IPC, answering from a real container-built engine."""

import pytest
import torch

from lmcache.config.compose import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.distributed.lookup import protocol
from lmcache.distributed.lookup.client import LookupClient
from lmcache.distributed.lookup.server import LookupServer
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.metadata import LMCacheMetadata

C, L, H, D, N, BLOCKS = 16, 2, 2, 8, 16, 8


@pytest.fixture
def worker(tmp_path):
    meta = LMCacheMetadata("org/m", 1, 0, torch.float32, (L, 2, C, H, D))
    layout = KVCacheLayout("cpu_packed", N, H, D)
    container = build_worker_container(compose_config([f"chunk_size={C}", "max_local_cpu_size=0.01"]),
                                       meta, layout)
    engine = container.engine()
    server = LookupServer(engine, protocol.lookup_address("test-engine", 0, str(tmp_path)))
    kv = [torch.randn(BLOCKS, H, N, 2 * D) for _ in range(L)]
    yield engine, server, kv
    server.close()
    shutdown(container)


def store(engine, kv, tokens):
    engine.store(tokens, kvcaches=kv, slot_mapping=torch.arange(16, 16 + tokens.numel()))


def test_lookup_counts_stored_prefix_and_pins_until_unpin(worker):
    engine, server, kv = worker
    tokens = torch.arange(100, 164)
    store(engine, kv, tokens[:48])
    client = LookupClient([server.address], timeout_ms=5000)
    assert client.lookup(tokens, "req-1") == 48
    assert client.lookup(tokens[:40], "req-2") == 32  # whole chunks of a shorter prompt
    assert client.lookup(torch.arange(7, 70), "req-3") == 0
    assert engine.stats.value("pinned_lookups") == 2
    client.unpin("req-1")
    client.unpin("req-2")
    assert engine.stats.value("pinned_lookups") == 0
    client.close()


def test_repeated_lookup_for_one_request_does_not_stack_pins(worker):
    engine, server, kv = worker
    tokens = torch.arange(64)
    store(engine, kv, tokens)
    client = LookupClient([server.address])
    for _ in range(3):
        assert client.lookup(tokens, "same") == 64
    assert engine.stats.value("pinned_lookups") == 1
    engine.lookup_unpin("same")
    assert engine.stats.value("pinned_lookups") == 0
    client.close()


def test_unreachable_worker_is_a_miss_not_an_error(tmp_path):
    client = LookupClient([protocol.lookup_address("nobody", 0, str(tmp_path))], timeout_ms=200)
    assert client.lookup([1, 2, 3], "r") == 0
    assert client.lookup([1, 2, 3], "r") == 0  # marked down: answered at once
    assert client.failures == 1 and client.stats["skipped_down"] == 1
    client.close()


def test_bad_request_is_answered_with_an_error(worker):
    _, server, _ = worker
    import zmq

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(server.address)
    sock.send(protocol.pack({"op": "explode"}))
    assert "explode" in protocol.unpack(sock.recv())["error"]
    sock.close(0)


@pytest.mark.parametrize("bad", ["", "a/b", "x\\y"])
def test_bad_engine_id_is_rejected(bad):
    with pytest.raises(ValueError, match="engine_id"):
        protocol.lookup_address(bad, 0)


def test_token_codec_round_trip_and_limits():
    t = torch.tensor([0, 1, 2**40, 5])
    assert protocol.decode_tokens(protocol.encode_tokens(t)).tolist() == t.tolist()
    with pytest.raises(ValueError, match="multiple of 8"):
        protocol.decode_tokens(b"123")
    with pytest.raises(ValueError, match="exceeds"):
        protocol.unpack(b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1))


def test_client_argument_errors():
    with pytest.raises(ValueError, match="at least one"):
        LookupClient([])
    with pytest.raises(ValueError, match="timeout_ms"):
        LookupClient(["ipc:///tmp/x"], timeout_ms=0)
    with pytest.raises(ValueError, match="retry_interval_ms"):
        LookupClient(["ipc:///tmp/x"], retry_interval_ms=-1)
    with pytest.raises(ValueError, match="max_retry_interval_ms"):
        LookupClient(["ipc:///tmp/x"], retry_interval_ms=500, max_retry_interval_ms=100)
