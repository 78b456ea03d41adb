"""PD backend between two processes through real NIXL/UCX: the prefiller's engine stores, the
decoder's engine retrieves the same KV bit for bit from its buffer, with no store in between."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

pytest.importorskip("nixl_cu12", reason="NIXL (pip nixl-cu12) is not installed")

from pd_peer import build_engine, free_ports, request, serve_decoder  # noqa: E402

from lmcache.containers import shutdown  # noqa: E402


def _spawn_decoder(init_port: int, alloc_port: int, buffer_chunks: int):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve_decoder, args=(child, init_port, alloc_port, buffer_chunks),
                       daemon=True)
    proc.start()
    assert parent.poll(180), "decoder did not start"
    assert parent.recv() == "ready"
    return proc, parent


def _call(conn, *cmd, timeout=60):
    conn.send(cmd)
    assert conn.poll(timeout), f"decoder did not answer {cmd[0]}"
    return conn.recv()


@pytest.fixture(scope="module")
def pd_pair():
    """A decoder process with a 6-chunk buffer and this process's prefiller engine."""
    init_port, alloc_port = free_ports(2)
    proc, conn = _spawn_decoder(init_port, alloc_port, 6)
    container, engine = build_engine("pd_prefiller", init_port, alloc_port, 8)
    yield container, engine, conn
    shutdown(container)
    _call(conn, "stop")
    proc.join(10)


def test_prefill_pushes_every_chunk_and_decoder_retrieves_it_exactly(pd_pair):
    container, engine, conn = pd_pair
    tokens, kv, slots = request(1, 40)  # 2 full chunks + a partial one (save_unfull_chunk forced)
    assert engine.store(tokens, kvcaches=kv, slot_mapping=slots) == 40
    sender = container.backends()[0].stats
    assert sender["pushed_chunks"] == 3 and sender["failed_pushes"] == 0
    assert sender["pushed_bytes"] == 2 * (2 * 2 * 16 * 2 * 64 * 4) + 2 * 2 * 8 * 2 * 64 * 4
    assert _call(conn, "lookup", 1, 40, False) == 40
    assert _call(conn, "retrieve", 1, 40) == (40, True)
    # the prefiller keeps nothing: its allocator is empty again
    assert container.allocator().used_bytes == 0
    # a second request sharing nothing: pushed as well; the first one is still held
    tokens2, kv2, slots2 = request(2, 16)
    assert engine.store(tokens2, kvcaches=kv2, slot_mapping=slots2) == 16
    assert _call(conn, "retrieve", 2, 16) == (16, True)
    assert _call(conn, "retrieve", 1, 40) == (40, True)
    # pushing chunks the decoder already holds writes nothing again
    before = container.backends()[0].stats
    engine.store(tokens, kvcaches=kv, slot_mapping=slots)
    after = container.backends()[0].stats
    assert after["skipped_chunks"] - before["skipped_chunks"] == 3
    assert after["pushed_bytes"] == before["pushed_bytes"]


def test_full_decoder_buffer_waits_then_drops_and_decoder_recomputes(pd_pair):
    container, engine, conn = pd_pair
    tokens, kv, slots = request(3, 48)  # 3 chunks
    assert engine.store(tokens, kvcaches=kv, slot_mapping=slots) == 48
    assert _call(conn, "lookup", 3, 48, True) == 48  # pinned: not evictable
    tokens4, kv4, slots4 = request(4, 64)  # 4 chunks; only 3 free slots minus pinned ones
    assert _call(conn, "lookup", 1, 40, True) == 40  # pin the other 3 chunks too: buffer is 6
    t0 = time.monotonic()
    engine.store(tokens4, kvcaches=kv4, slot_mapping=slots4)
    waited = time.monotonic() - t0
    assert 0.5 <= waited < 3.0  # pd_allocation_timeout_sec=0.5, then gives up
    assert container.backends()[0].stats["dropped_chunks"] >= 4
    assert _call(conn, "lookup", 4, 64, False) == 0  # nothing of it: the decoder recomputes
    assert _call(conn, "stats")["alloc_full"] >= 1
    _call(conn, "unpin", 3)
    _call(conn, "unpin", 1)
    engine.store(tokens4, kvcaches=kv4, slot_mapping=slots4)  # room again (LRU eviction)
    assert _call(conn, "retrieve", 4, 64) == (64, True)


def test_decoder_restart_fails_a_push_cleanly_and_the_next_one_reconnects():
    init_port, alloc_port = free_ports(2)
    proc, conn = _spawn_decoder(init_port, alloc_port, 6)
    container, engine = build_engine("pd_prefiller", init_port, alloc_port, 8)
    try:
        tokens, kv, slots = request(5, 32)
        engine.store(tokens, kvcaches=kv, slot_mapping=slots)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)
        t0 = time.monotonic()
        tokens6, kv6, slots6 = request(6, 32)
        assert engine.store(tokens6, kvcaches=kv6, slot_mapping=slots6) == 32  # the store succeeds
        assert time.monotonic() - t0 < 8.0  # one 2 s control deadline, plus a loaded machine
        stats = container.backends()[0].stats
        assert stats["failed_pushes"] == 1
        proc, conn = _spawn_decoder(init_port, alloc_port, 6)  # restarted decoder
        assert _call(conn, "lookup", 6, 32, False) == 0  # lost with the old process
        tokens7, kv7, slots7 = request(7, 32)
        assert engine.store(tokens7, kvcaches=kv7, slot_mapping=slots7) == 32
        assert _call(conn, "retrieve", 7, 32) == (32, True)
        assert container.allocator().used_bytes == 0
    finally:
        shutdown(container)
        if proc.is_alive():
            _call(conn, "stop")
            proc.join(10)
