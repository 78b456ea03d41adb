"""The MP protocol's values and wire codec, without a server: msgpack round trips of every
custom type, the CPU shared-memory stand-in of CUDA IPC (a real shared tensor opened again),
request/response table, failure results, and the message queue client's timeout."""

from __future__ import annotations

import time

import msgpack
import pytest
import torch
import zmq

from lmcache.v1.multiprocess.custom_types import (
    BlockAllocationRecord, CudaIPCWrapper, IPCCacheEngineKey, RequestAllocationRecord, dtype_from_name)
from lmcache.v1.multiprocess.mq import MessageQueueClient, MessagingFuture, MPRequestError
from lmcache.v1.multiprocess.protocol import (
    RequestType, failure_result, get_response_class, pack, unpack)


def test_key_round_trip_and_no_worker_id_version():
    key = IPCCacheEngineKey("org/model", 4, 2, tuple(range(300)), 256, 300, "req-1",
                            tp_size=4, cache_salt="s")
    back = unpack(pack([[key, key.no_worker_id_version()], 7]))
    assert back == [[key, key.no_worker_id_version()], 7]
    assert back[0][1].worker_id is None and back[0][1].token_ids == key.token_ids
    assert torch.equal(back[0][0].token_tensor(), torch.arange(300))        # from the wire bytes
    assert torch.equal(key.token_tensor(10), torch.arange(10))              # from the tuple
    assert key.token_range() == (256, 300)
    assert IPCCacheEngineKey("m", 1, 0, (1, 2, 3)).token_range() == (0, 3)
    hashed = IPCCacheEngineKey("m", 1, None, chunk_hash=b"\x00\xff", request_id="r")
    assert unpack(pack(hashed)) == hashed
    with pytest.raises(ValueError, match="hash-mode"):
        hashed.token_range()
    with pytest.raises(ValueError, match=r"range \[5, 3\)"):
        IPCCacheEngineKey("m", 1, 0, (1, 2, 3), 5, 3).token_range()


def test_allocation_record_round_trip_and_alias():
    rec = RequestAllocationRecord("r", [3, 4], [10, 11, 12])
    assert BlockAllocationRecord is RequestAllocationRecord
    assert unpack(pack([rec])) == [rec]


def test_cpu_ipc_wrapper_shares_the_live_tensor():
    whole = torch.arange(2 * 6 * 4, dtype=torch.bfloat16).view(2, 6, 4)
    layer = whole[1]                                   # a view at an offset, as vLLM's layers
    wrapper = unpack(pack(CudaIPCWrapper(layer)))
    assert (wrapper.kind, wrapper.dtype, wrapper.shape) == ("cpu_shm", "bfloat16", (6, 4))
    opened = wrapper.to_tensor()
    assert torch.equal(opened, layer) and opened.data_ptr() != 0
    opened[2].fill_(7)                                 # writes reach the original tensor
    assert torch.equal(whole[1, 2], torch.full((4,), 7, dtype=torch.bfloat16))
    assert torch.equal(whole[0], torch.arange(24, dtype=torch.bfloat16).view(6, 4))


def test_bad_values_are_named():
    with pytest.raises(TypeError, match="torch.Tensor"):
        CudaIPCWrapper([1, 2])
    with pytest.raises(ValueError, match="unknown KV cache dtype 'float7'"):
        dtype_from_name("float7")
    with pytest.raises(TypeError, match="cannot send a set"):
        pack({1, 2})
    with pytest.raises(ValueError, match="unknown MP protocol ext type 99"):
        unpack(msgpack.packb(msgpack.ExtType(99, b"")))
    with pytest.raises(ValueError, match="unknown MP request type 999"):
        get_response_class(999)


def test_response_classes_and_failure_results():
    assert get_response_class(RequestType.GET_CHUNK_SIZE) is int
    assert get_response_class(RequestType.LOOKUP) is int
    assert get_response_class(RequestType.HEARTBEAT) is dict
    assert failure_result(RequestType.LOOKUP) == 0
    assert failure_result(RequestType.STORE) == [b"", False]
    assert failure_result(RequestType.RETRIEVE) == [b"", [False]]
    assert failure_result(RequestType.GET_CHUNK_SIZE) is None
    assert {t.name for t in RequestType} >= {"REGISTER_KV_CACHE", "UNREGISTER_KV_CACHE", "STORE",
                                            "RETRIEVE", "LOOKUP", "END_SESSION", "GET_CHUNK_SIZE"}


def test_client_without_server_times_out_as_a_miss():
    """Nobody listens: a lookup times out as 0 hits, a store as False, GET_CHUNK_SIZE raises;
    fail_pending completes what is still pending."""
    with socket_port() as port:
        client = MessageQueueClient(f"tcp://127.0.0.1:{port}", zmq.Context.instance(), timeout=0.3)
        try:
            t0 = time.monotonic()
            assert client.submit_request(RequestType.LOOKUP, [[]]).result(5) == 0
            assert client.submit_request(RequestType.STORE, []).to_cuda_future().result(5) is False
            with pytest.raises(MPRequestError, match="GET_CHUNK_SIZE lost"):
                client.submit_request(RequestType.GET_CHUNK_SIZE, []).result(5)
            assert time.monotonic() - t0 < 4
            client.timeout = None
            pending = client.submit_request(RequestType.RETRIEVE, [])
            assert not pending.query()
            assert client.fail_pending("test") == 1
            assert pending.to_cuda_future().result(1) == [False]
        finally:
            client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.submit_request(RequestType.LOOKUP, [])


def test_completed_future():
    f = MessagingFuture.completed(5)
    assert f.query() and f.result() == 5
    with pytest.raises(TimeoutError):
        MessagingFuture().result(0.01)


class socket_port:
    """A TCP port with nothing listening (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None
