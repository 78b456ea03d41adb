"""A worker's KV cache registration racing its own heartbeats (real server process).

1. A heartbeat the server answers just before the worker's REGISTER_KV_CACHE reaches it says
   "not registered", and the link calls the worker's ``on_connect``: it must wait for the
   registration in flight instead of sending a second one (which replaces the server's mapping
   and fails any transfer already running against the first).
2. ``shutdown()`` unregisters: a heartbeat answered after that must not register the KV caches
   again (the server would keep a mapping of an engine that is gone, until it is reaped).

With a 1 ms heartbeat interval nearly every adapter hits one of the two windows: before the
fixes, 15-23 of 20-40 adapters registered a second time.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import zmq

from lmcache.integration.vllm.vllm_multi_process_adapter import (
    LMCacheMPWorkerAdapter, ParallelStrategy)
from lmcache.v1.multiprocess.mq import MessageQueueClient
from lmcache.v1.multiprocess.protocol import RequestType
from mp_server_proc import SHARED_CHUNK

PS = ParallelStrategy(False, 1, 0, 1, 0, 1, 1)
ADAPTERS = 20


def registered(url: str, instance_id: int) -> bool:
    """The server's answer to a heartbeat naming ``instance_id``: is it registered?"""
    client = MessageQueueClient(url, zmq.Context.instance(), timeout=10)
    try:
        return client.submit_request(RequestType.HEARTBEAT, [instance_id, "probe"]).result(10)[
            "registered"]
    finally:
        client.close()


def test_registration_racing_heartbeats_registers_once_and_stays_unregistered(mp_url, caplog):
    caplog.set_level(logging.INFO, logger="lmcache.integration.vllm.vllm_multi_process_adapter")
    kv = torch.zeros(8, 1, SHARED_CHUNK, 8)
    for i in range(ADAPTERS):
        w = LMCacheMPWorkerAdapter(mp_url, zmq.Context.instance(), "m-reg-race", SHARED_CHUNK,
                                   PS, mq_timeout=10, heartbeat_interval=0.001)
        try:
            assert w.link.connected and w.link.epoch is not None  # first beat at construction
            time.sleep(0.002 * (i % 4))                           # land at varied beat phases
            w.register_kv_caches({"l0": kv})
            assert registered(mp_url, w.instance_id)
            time.sleep(0.02)                                      # ~20 more heartbeats
            assert w.link.connected
        finally:
            w.shutdown()
        time.sleep(0.005)       # a heartbeat in flight at shutdown would have landed by now
        assert not registered(mp_url, os.getpid()), f"adapter {i} registered after shutdown"
    text = caplog.text
    assert text.count("Registering 1 KV cache layers") == ADAPTERS
    assert text.count("Re-registered") == 0, text.count("Re-registered")
