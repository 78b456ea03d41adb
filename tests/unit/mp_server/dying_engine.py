"""Child process of test_mp_faults: an engine that registers, stores, looks up (pinning) and
starts a retrieve, then dies by SIGKILL mid-request. argv: server url."""

import os
import signal
import sys
import time

import torch
import zmq

from lmcache.integration.vllm.vllm_multi_process_adapter import (
    LMCacheMPSchedulerAdapter, LMCacheMPWorkerAdapter, LoadStoreOp, ParallelStrategy)

url = sys.argv[1]
ps = ParallelStrategy(False, 1, 0, 1, 0, 1, 1)
ctx = zmq.Context.instance()
w = LMCacheMPWorkerAdapter(url, ctx, "m-die", 16, ps, mq_timeout=10, heartbeat_interval=0.3)
s = LMCacheMPSchedulerAdapter(url, ctx, "m-die", 16, ps, mq_timeout=10, heartbeat_interval=0.3)
kv = torch.randn(1, 40, 1, 16, 8, generator=torch.Generator().manual_seed(42))
w.register_kv_caches({"l0": kv[0]})
tokens = list(range(256))
w.batched_submit_store_requests(["a"], [LoadStoreOp(list(range(1, 17)), tokens, start=0, end=256)], None)
while "a" not in w.get_finished({"a"})[0]:
    time.sleep(0.01)
s.maybe_submit_lookup_request("dying", token_ids=tokens)
while s.check_lookup_result("dying") is None:
    time.sleep(0.01)
print("hit", s.check_lookup_result("dying"), flush=True)
w.batched_submit_retrieve_requests(["dying"], [LoadStoreOp(list(range(20, 36)), tokens, start=0, end=256)], None)
os.kill(os.getpid(), signal.SIGKILL)
