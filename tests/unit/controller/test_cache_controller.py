"""CacheController + LMCacheWorker in one process over real ZMQ: registration, admit/evict
events, lookup, P2P lookup, clear/pin/health commands, silent workers dropped, controller
restart (full sync)."""

from __future__ import annotations

import time

import zmq

from lmcache.controller.cache_controller import CacheController
from lmcache.controller.index.memory import MemoryChunkIndex
from lmcache.controller.protocol import ADMIT, decode, encode
from lmcache.token_database.chunked import ChunkedTokenDatabase

from controller_fleet import C, Worker, eventually, tokens


def test_register_events_and_lookup(controller, make_worker):
    a, b = make_worker("A"), make_worker("B")
    assert eventually(lambda: len(controller.index.workers()) == 2)
    info = {w.instance_id: w for w in controller.index.workers()}
    assert info["A"].tiers == ["LocalCPUBackend"] and info["A"].model_name == "lmcache/ctl-test"
    t = tokens(1, 5)
    assert a.store(t) == 5 and b.store(t[:2 * C]) == 2
    assert eventually(lambda: controller.index.num_entries() == 7)
    assert controller.lookup(t) == {"A": ("LocalCPUBackend", 5 * C),
                                    "B": ("LocalCPUBackend", 2 * C)}
    assert controller.lookup(tokens(2, 3)) == {}
    hashes = [h for _, h in controller.hashes(t)]
    # a peer without a P2P address (no p2p tier) is never offered for a pull
    assert controller.p2p_lookup("B", 0, hashes)["num_hit_chunks"] == 0
    a.cpu.remove([k for _, _, k in a.db.process_tokens(t)][3])  # evict chunk 3 of A
    assert eventually(lambda: controller.lookup(t)["A"] == ("LocalCPUBackend", 3 * C))


def test_p2p_lookup_picks_the_longest_prefix_of_another_instance(controller):
    idx = controller.index
    from lmcache.controller.chunk_index import WorkerInfo
    for inst, n in (("A", 2), ("B", 4), ("C", 3)):
        idx.register(WorkerInfo(inst, 0, "127.0.0.1", 1, peer_init_url=f"h:{n}",
                                last_heartbeat_time=time.time()))
        idx.apply(inst, 0, "LocalCPUBackend", [(ADMIT, h) for h in range(n)])
    idx.apply("C", 0, "LocalDiskBackend", [(ADMIT, 3)])  # not servable by P2P
    assert controller.p2p_lookup("A", 0, [0, 1, 2, 3, 4]) == {
        "instance_id": "B", "location": "LocalCPUBackend", "num_hit_chunks": 4,
        "peer_init_url": "h:4"}
    assert controller.p2p_lookup("B", 0, [0, 1, 2, 3])["instance_id"] == "C"
    assert controller.p2p_lookup("A", 1, [0, 1])["num_hit_chunks"] == 0  # other rank


def test_clear_pin_health_commands(controller, make_worker):
    a = make_worker("A")
    t = tokens(3, 4)
    a.store(t)
    assert eventually(lambda: controller.index.num_entries() == 4)
    assert controller.health("A") == {0: 0}
    assert controller.pin("A", "LocalCPUBackend", t[:3 * C]) == 3 * C
    keys = [k for _, _, k in a.db.process_tokens(t)]
    assert [a.cpu.hot_cache[k].is_pinned for k in keys] == [True, True, True, False]
    for k in keys[:3]:
        a.cpu.unpin(k)
    assert controller.clear("A", "LocalCPUBackend") == 4 * C
    assert len(a.cpu) == 0
    assert eventually(lambda: controller.index.num_entries() == 0)
    try:
        controller.clear("nobody", "LocalCPUBackend")
        raise AssertionError("expected KeyError")
    except KeyError as e:
        assert "nobody" in str(e)


def test_move_between_tiers_of_one_instance(controller, make_worker):
    a = make_worker("A")
    t = tokens(4, 2)
    a.store(t)
    # no second tier: move to an unknown tier is an error naming the tiers
    try:
        controller.move(("A", "LocalCPUBackend"), ("A", "LocalDiskBackend"), t)
        raise AssertionError("expected an error")
    except RuntimeError as e:
        assert "no tier named 'LocalDiskBackend'" in str(e) and "LocalCPUBackend" in str(e)


def test_silent_worker_is_dropped_with_its_chunks(controller, make_worker):
    a, b = make_worker("A"), make_worker("B")
    a.store(tokens(5, 3))
    b.store(tokens(6, 2))
    assert eventually(lambda: controller.index.num_entries() == 5)
    a.worker._stop.set()  # A stops heartbeating (as a killed process would)
    assert eventually(lambda: [w.instance_id for w in controller.index.workers()] == ["B"], 5)
    assert controller.index.num_entries() == 2 and controller.stats["dropped_workers"] == 1


def test_restarted_controller_gets_a_full_sync(controller, make_worker):
    a = make_worker("A", heartbeat=0.05)
    t = tokens(7, 3)
    a.store(t)
    assert eventually(lambda: controller.index.num_entries() == 3)
    # a new controller on the same ports, with an empty in-memory index
    pull, reply = controller.pull_port, controller.reply_port
    controller.close()
    fresh = CacheController(MemoryChunkIndex(), ChunkedTokenDatabase(None, chunk_size=C),
                            controller_host="127.0.0.1",
                            controller_monitor_ports={"pull": pull, "reply": reply})
    try:
        assert eventually(lambda: fresh.lookup(t) == {"A": ("LocalCPUBackend", 3 * C)}, 15)
        assert a.worker.stats["registrations"] >= 2
    finally:
        fresh.close()


def test_malformed_requests_get_an_error_reply(controller):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{controller.reply_port}")
    try:
        for bad, why in ((b"\xc1junk", "not a msgpack"), (encode({"x": 1}), "'op'"),
                         (encode({"op": "fly"}), "unknown op"),
                         (encode({"op": "heartbeat"}), "KeyError")):
            sock.send(bad)
            reply = decode(sock.recv(), reply=True)
            assert why in reply["error"], (bad, reply)
    finally:
        sock.close()


def test_worker_serves_without_a_controller():
    """No controller at all: the worker retries in the background, the tier works."""
    ctl_stub = type("Stub", (), {"pull_port": 9, "reply_port": 9})()
    w = Worker(ctl_stub, "lonely")
    try:
        t = tokens(8, 2)
        assert w.store(t) == 2
        keys = [k for _, _, k in w.db.process_tokens(t)]
        assert w.manager.contains_prefix(keys) == 2
        time.sleep(0.2)
        assert not w.worker.registered.is_set()
    finally:
        t0 = time.monotonic()
        w.close()
        assert time.monotonic() - t0 < 5
