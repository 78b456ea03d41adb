"""The controller and two instances as real processes: ZMQ events, the HTTP API, P2P pulls of
exact KV through real NIXL (UCX, host memory), and faults — a peer stopped or killed during a
pull costs a miss within the deadline (never wrong KV, never a hang), a killed controller leaves
the instances serving their local hits and a restarted one gets everything back by full sync.

Heavy (three Python processes): run under the heavy lock.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from p2p_instance import C, seed_data  # noqa: E402
from p2p_procs import Controller, Instance, eventually, p2p_overrides  # noqa: E402

pytest.importorskip("nixl_cu12", reason="NIXL (pip nixl-cu12) is needed for the P2P tests")

N = 4  # chunks per seed


def toks(seed: int) -> list[int]:
    return seed_data(seed, N)[0].tolist()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    ctl = Controller(timeout=3.0, log=logs / "controller.log")
    a = b = None
    try:
        a = Instance(p2p_overrides("A", ctl), log=logs / "a.log")
        b = Instance(p2p_overrides("B", ctl), log=logs / "b.log")
        assert eventually(lambda: ctl.get("/health")["workers"] == 2, 20)
        yield ctl, a, b, logs
    finally:
        for inst in (a, b):
            if inst is not None:
                inst.close()
        ctl.stop()


def test_events_index_and_http_lookup(fleet):
    ctl, a, b, _ = fleet
    assert a.call("store", seed=1, chunks=N)["tokens"] == N * C
    assert eventually(lambda: ctl.post("/lookup", {"tokens": toks(1)})["layout_info"]
                      == {"A": ["LocalCPUBackend", N * C]})
    infos = ctl.post("/query_worker_info", {"instance_id": "A"})["worker_infos"]
    assert [(w["instance_id"], w["tiers"]) for w in infos] == [("A", ["LocalCPUBackend",
                                                                       "P2PBackend"])]
    assert ctl.post("/health", {"instance_id": "B"})["error_codes"] == {"0": 0}


def test_peers_meet_at_registration_before_any_pull(fleet):
    # the controller names A in B's register/heartbeat replies; B's P2P tier says hello
    # (NIXL metadata) in the background, so the first pull does not pay the set-up
    ctl, a, b, _ = fleet
    a_url = a.info["peer_init_url"]
    assert eventually(lambda: b.call("stats", peers=[a_url])["knows_peer"] == {a_url: True}, 10)
    assert b.call("stats")["p2p"]["pulls"] == 0
    b_url = b.info["peer_init_url"]
    assert eventually(lambda: a.call("stats", peers=[b_url])["knows_peer"] == {b_url: True}, 10)


def test_b_pulls_exact_kv_from_a(fleet):
    ctl, a, b, _ = fleet
    assert b.call("lookup", seed=1, chunks=N)["tokens"] == N * C
    got = b.call("retrieve", seed=1, chunks=N)
    assert got == {"tokens": N * C, "exact": True, "zeros_elsewhere": True}
    stats = b.call("stats")
    assert stats["p2p"]["pulled_chunks"] >= N and stats["p2p"]["pull_failures"] == 0
    assert stats["cpu_chunks"] == N  # written back into B's CPU tier ...
    assert eventually(lambda: ctl.post("/lookup", {"tokens": toks(1)})["layout_info"]
                      == {"A": ["LocalCPUBackend", N * C], "B": ["LocalCPUBackend", N * C]})
    again = b.call("retrieve", seed=1, chunks=N)  # ... so the next retrieve is local
    assert again["exact"] and b.call("stats")["p2p"]["pulled_chunks"] == stats["p2p"]["pulled_chunks"]


def test_http_pin_clear_move(fleet):
    ctl, a, b, _ = fleet
    assert a.call("store", seed=2, chunks=N)["tokens"] == N * C
    assert ctl.post("/pin", {"instance_id": "A", "location": "LocalCPUBackend",
                             "tokens": toks(2)[:2 * C]})["num_tokens"] == 2 * C
    # move = copy A's chunks into B (B pulls them over P2P)
    assert eventually(lambda: "A" in ctl.post("/lookup", {"tokens": toks(2)})["layout_info"])
    moved = ctl.post("/move", {"old_position": ["A", "LocalCPUBackend"],
                               "new_position": ["B", "LocalCPUBackend"], "tokens": toks(2),
                               "should_copy": True})
    assert moved["num_tokens"] == N * C
    assert eventually(lambda: ctl.post("/lookup", {"tokens": toks(2)})["layout_info"].get("B")
                      == ["LocalCPUBackend", N * C])
    pulled = b.call("stats")["p2p"]["pulled_chunks"]
    assert b.call("retrieve", seed=2, chunks=N)["exact"]
    assert b.call("stats")["p2p"]["pulled_chunks"] == pulled  # served from B's own CPU tier
    cleared = ctl.post("/clear", {"instance_id": "B", "location": "LocalCPUBackend"})
    assert cleared["num_tokens"] == 2 * N * C and b.call("stats")["cpu_chunks"] == 0


def test_peer_stopped_during_a_pull_is_a_miss_within_the_deadline(fleet):
    ctl, a, b, logs = fleet
    assert a.call("store", seed=3, chunks=N)["tokens"] == N * C
    assert eventually(lambda: "A" in ctl.post("/lookup", {"tokens": toks(3)})["layout_info"])
    os.kill(a.proc.pid, signal.SIGSTOP)  # A stops answering (a hung or dying process)
    try:
        t0 = time.monotonic()
        got = b.call("retrieve", seed=3, chunks=N)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert got == {"tokens": 0, "exact": True, "zeros_elsewhere": True}
    assert elapsed < 2.0 + 3.0  # blocking_timeout_secs of the pull + process overhead
    assert b.call("stats")["p2p"]["pull_failures"] >= 1
    assert b.call("retrieve", seed=3, chunks=N)["exact"]  # A is back: pulled


def test_controller_killed_then_restarted(fleet):
    ctl, a, b, logs = fleet
    ports = (ctl.http, ctl.pull, ctl.reply)
    ctl.kill()
    assert a.call("retrieve", seed=1, chunks=N) == {"tokens": N * C, "exact": True,
                                                    "zeros_elsewhere": True}  # local hits
    t0 = time.monotonic()
    assert b.call("retrieve", seed=9, chunks=N)["tokens"] == 0  # no controller: a quick miss
    assert time.monotonic() - t0 < 3.0
    assert a.call("store", seed=4, chunks=N)["tokens"] == N * C  # stores go on (events lost)
    fresh = Controller(timeout=3.0, log=logs / "controller2.log", ports=ports)
    ctl.proc = fresh.proc  # (the fixture stops the live one; same ports, same URL)
    # the workers re-register and send full syncs: seed 4 is known again
    assert eventually(lambda: fresh.post("/lookup", {"tokens": toks(4)})["layout_info"]
                      == {"A": ["LocalCPUBackend", N * C]}, 20)
    assert b.call("retrieve", seed=4, chunks=N) == {"tokens": N * C, "exact": True,
                                                    "zeros_elsewhere": True}


def test_peer_killed_mid_pull_is_a_miss_and_is_dropped(fleet, tmp_path):
    ctl, a, b, _ = fleet
    assert a.call("store", seed=5, chunks=N)["tokens"] == N * C
    assert eventually(lambda: "A" in ctl.post("/lookup", {"tokens": toks(5)})["layout_info"])
    gate = tmp_path / "go"
    b.call("pause_before_read", path=str(gate))
    result = {}
    t = threading.Thread(target=lambda: result.update(b.call("retrieve", seed=5, chunks=N)))
    t0 = time.monotonic()
    t.start()
    # B has acquired A's chunks (A holds them under a lease) and waits at the gate: kill A
    # there, then let B read from the dead peer's memory
    assert eventually(lambda: Path(str(gate) + ".reached").exists(), 20)
    a.kill()
    gate.touch()
    t.join(30)
    assert not t.is_alive()
    assert result == {"tokens": 0, "exact": True, "zeros_elsewhere": True}
    assert time.monotonic() - t0 < 10
    assert eventually(lambda: ctl.post("/lookup", {"tokens": toks(5)})["layout_info"] == {},
                      15)  # A dropped after its heartbeats stopped
