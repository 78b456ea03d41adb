"""P2PClient's kept REQ sockets against a real ZMQ ROUTER server (each connection has its own
routing id, so the server sees whether a request came on a kept or a fresh socket): one socket
kept per URL across requests, a timed-out socket replaced (a late reply never answers the next
request), error replies and a closed client answer None, and a controller that does not answer
costs one lookup timeout and then lookups are skipped."""

from __future__ import annotations

import threading
import time
from typing import Optional

import msgpack
import pytest
import torch
import zmq

from lmcache.controller.protocol import decode, encode
from lmcache.keys import CacheEngineKey
from lmcache.storage.backends.p2p_client import P2PClient


class Router:
    """A ROUTER server run by the test, one request at a time."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.url = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"

    def recv(self, timeout: float = 5.0) -> tuple[bytes, dict]:
        assert self.sock.poll(int(timeout * 1000)), "no request arrived"
        ident, _, body = self.sock.recv_multipart()
        return ident, decode(body)

    def reply(self, ident: bytes, msg: dict) -> None:
        self.sock.send_multipart([ident, b"", encode(msg)])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture
def server():
    with Router() as s:
        yield s


def make_client(reply_url: str = "tcp://127.0.0.1:1", channel=None, **kw) -> P2PClient:
    """A P2PClient as instance "B" (worker 0); ``kw`` overrides the fixture's timeouts and
    stats (default: nothing listens at ``reply_url``)."""
    args = {"lookup_timeout": 0.2, "retry_interval": 60.0, "lookup_cache_secs": 2.0,
            "hello_timeout": 1.0, "stats": {"lookups": 0, "lookup_failures": 0}, **kw}
    return P2PClient(channel, "B", 0, reply_url, **args)


@pytest.fixture
def client():
    c = make_client()
    yield c
    c.close()


def serve(server: Router, replies: list, idents: list) -> threading.Thread:
    def run() -> None:
        for answer in replies:
            ident, msg = server.recv()
            idents.append(ident)
            if answer is not None:
                server.reply(ident, {**answer, "n": msg["n"]})

    t = threading.Thread(target=run)
    t.start()
    return t


def lookup_answered(c: P2PClient, keys: list, server: Router,
                    answer: dict) -> tuple[tuple[int, str], Optional[dict]]:
    """``c.lookup(keys)`` while ``server`` (the controller's reply socket) answers the one
    lookup it receives with ``answer`` (msgpack, as the controller does); returns the lookup's
    result and the request the server saw (None if none came within 5 s)."""
    seen: list = []

    def run() -> None:
        ident, msg = server.recv()
        seen.append(msg)
        server.sock.send_multipart([ident, b"", msgpack.packb(answer)])

    t = threading.Thread(target=run)
    t.start()
    try:
        return c.lookup(keys), (seen[0] if seen else None)
    finally:
        t.join(5)


def test_one_socket_is_kept_per_url(server, client):
    idents: list = []
    t = serve(server, [{"ok": True}] * 3, idents)
    replies = [client.request(server.url, {"op": "x", "n": i}, 2.0) for i in range(3)]
    t.join(5)
    assert replies == [{"ok": True, "n": 0}, {"ok": True, "n": 1}, {"ok": True, "n": 2}]
    assert len(set(idents)) == 1  # three round trips on one connection


def test_a_timed_out_socket_is_replaced_and_its_late_reply_is_never_read(server, client):
    t0 = time.monotonic()
    assert client.request(server.url, {"op": "x", "n": 1}, 0.2) is None  # nobody answers yet
    assert 0.15 < time.monotonic() - t0 < 1.5
    late, msg = server.recv()
    assert msg["n"] == 1
    server.reply(late, {"late": True, "n": 1})  # to the closed socket: dropped
    idents: list = []
    t = serve(server, [{"ok": True}], idents)
    assert client.request(server.url, {"op": "x", "n": 2}, 2.0) == {"ok": True, "n": 2}
    t.join(5)
    assert idents and idents[0] != late  # a fresh connection


def test_error_reply_is_none_and_the_socket_stays_usable(server, client):
    idents: list = []
    t = serve(server, [{"error": "bad"}, {"ok": True}], idents)
    assert client.request(server.url, {"op": "x", "n": 1}, 2.0) is None
    assert client.request(server.url, {"op": "x", "n": 2}, 2.0) == {"ok": True, "n": 2}
    t.join(5)
    assert len(set(idents)) == 1


def test_pending_replies_overlap_work_and_a_closed_client_answers_none(server, client):
    idents: list = []
    t = serve(server, [{"ok": True}], idents)
    pending = client.send(server.url, {"op": "x", "n": 7}, 2.0)
    busy = sum(range(10000))  # (the caller works while the server answers)
    assert pending.result() == {"ok": True, "n": 7} and busy == 49995000
    assert pending.result() is None  # a reply is read once
    t.join(5)
    client.close()
    assert client.request(server.url, {"op": "x", "n": 8}, 0.2) is None


def test_a_silent_controller_costs_one_timeout_then_lookups_are_skipped(client):
    keys = [CacheEngineKey("m", 1, 0, h, torch.float32) for h in (1, 2)]
    t0 = time.monotonic()
    assert client.lookup(keys) == (0, "")
    assert 0.15 < time.monotonic() - t0 < 1.5  # lookup_timeout 0.2 s (nothing listens)
    t0 = time.monotonic()
    assert client.lookup(keys) == (0, "")  # within retry_interval: not asked
    assert time.monotonic() - t0 < 0.05
    assert client.stats == {"lookups": 1, "lookup_failures": 1}


def test_a_controller_that_stays_down_is_asked_less_and_less_often(server):
    """Each lookup of a down controller blocks for lookup_timeout (on vLLM's lookup path), so
    the skip doubles per failure in a row (up to 16 x retry_interval) and resets on an answer."""
    keys = [CacheEngineKey("m", 1, 0, h, torch.float32) for h in (1, 2)]
    stats = {"lookups": 0, "lookup_failures": 0}
    c = make_client(lookup_timeout=0.01, retry_interval=10.0, stats=stats)
    try:
        skips = []
        for _ in range(7):
            c._controller_down_until = 0.0  # (as if the skip had passed)
            assert c.lookup(keys) == (0, "")
            skips.append(round((c._controller_down_until - time.monotonic()) / 10.0))
        assert skips == [1, 2, 4, 8, 16, 16, 16] and stats["lookup_failures"] == 7
        c.reply_url, c.lookup_timeout = server.url, 5.0  # back: an answer resets the backoff
        c._controller_down_until = 0.0
        result, _ = lookup_answered(c, keys, server, {"num_hit_chunks": 0, "peer_init_url": ""})
        assert result == (0, "")
        assert stats == {"lookups": 8, "lookup_failures": 7}
        c.reply_url, c.lookup_timeout = "tcp://127.0.0.1:1", 0.01
        assert c.lookup(keys) == (0, "")
        assert round((c._controller_down_until - time.monotonic()) / 10.0) == 1
    finally:
        c.close()


def test_a_controller_answer_is_cached_for_its_keys(server):
    c = make_client(server.url, lookup_timeout=2.0, retry_interval=1.0, lookup_cache_secs=30.0)
    try:
        keys = [CacheEngineKey("m", 1, 0, h, torch.float32) for h in (1, 2, 3)]
        result, msg = lookup_answered(c, keys, server,
                                      {"num_hit_chunks": 2, "peer_init_url": "127.0.0.1:5555"})
        assert result == (2, "127.0.0.1:5555")
        assert msg["hashes"] == [1, 2, 3] and msg["instance_id"] == "B"
        assert [c.cached_peer(k) for k in keys] == ["127.0.0.1:5555", "127.0.0.1:5555", None]
    finally:
        c.close()


def test_concurrent_callers_share_one_hello(server):
    pytest.importorskip("nixl_cu12", reason="NIXL (pip nixl-cu12) loads the peer's metadata")
    from lmcache.transfer.nixl import NixlChannel

    mine, theirs = (NixlChannel(n, [torch.zeros(4096, dtype=torch.uint8)]) for n in ("b", "a"))
    c = make_client(channel=mine, lookup_timeout=1.0, retry_interval=1.0, lookup_cache_secs=1.0,
                    hello_timeout=5.0, stats={})
    try:
        init_url = server.url[len("tcp://"):]
        got: list = []
        callers = [threading.Thread(target=lambda: got.append(c.peer(init_url)))
                   for _ in range(3)]
        for t in callers:
            t.start()
        ident, msg = server.recv()
        assert msg == {"op": "hello"}
        time.sleep(0.1)  # the other callers wait for this hello instead of sending their own
        server.reply(ident, {"metadata": theirs.agent_metadata(), "instance_id": "A",
                             "lookup_url": "127.0.0.1:7777"})
        for t in callers:
            t.join(5)
        assert got == [("a", "tcp://127.0.0.1:7777")] * 3
        assert not server.sock.poll(200)  # no second hello
        assert c.knows(init_url)
    finally:
        c.close()
        mine.close()
        theirs.close()
