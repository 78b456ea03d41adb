"""LMCache 0.5.6's side of the lm:// interop checks. Runs in the interop venv (real LMCache).

    python lm_lmcache_side.py put|get PORT SPEC_JSON

Uses LMCache's own ``LMCServerConnector`` (``lmcache.v1.storage_backend.connector.lm_connector``)
with a real ``LocalCPUBackend``. SPEC_JSON is a list of ``{"key", "shape", "dtype", "fmt"}``; every
value is ``shake_256(key)`` bytes, so both sides know it without sharing memory. ``put`` stores
each; ``get`` prints one JSON object: key -> "ok" | "miss" | a description of the difference.
"""

import asyncio
import hashlib
import json
import sys
import threading

import torch
from lmcache.utils import parse_cache_key
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def expected(key: str, nbytes: int) -> bytes:
    return hashlib.shake_256(key.encode()).digest(nbytes)


def main() -> int:
    op, port, spec = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    shape0 = spec[0]["shape"]  # [2, L, T, D] of a full chunk
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=shape0[2], local_cpu=True,
                                            max_local_cpu_size=0.05)
    md = LMCacheMetadata(model_name="m", world_size=1, local_world_size=1, worker_id=0,
                         local_worker_id=0, kv_dtype=DTYPES[spec[0]["dtype"]],
                         kv_shape=(shape0[1], 2, shape0[2], 1, shape0[3]),
                         chunk_size=shape0[2])
    cpu = LocalCPUBackend(cfg, md)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    conn = LMCServerConnector("127.0.0.1", port, loop, cpu)

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    out = {}
    for item in spec:
        key = parse_cache_key(item["key"])
        shape, dtype = torch.Size(item["shape"]), DTYPES[item["dtype"]]
        nbytes = shape.numel() * dtype.itemsize
        if op == "put":
            obj = cpu.allocate(shape, dtype, MemoryFormat(item["fmt"]))
            raw = torch.frombuffer(bytearray(expected(item["key"], nbytes)), dtype=torch.uint8)
            obj.tensor.view(torch.uint8).view(-1)[:] = raw
            run(conn.put(key, obj))
            obj.ref_count_down()
            out[item["key"]] = "put"
        else:
            if not run(conn.exists(key)):
                out[item["key"]] = "miss (exists)"
                continue
            obj = run(conn.get(key))
            if obj is None:
                out[item["key"]] = "miss"
                continue
            got = bytes(obj.tensor.contiguous().view(torch.uint8).view(-1).tolist())
            meta = (list(obj.get_shape()), str(obj.get_dtype()).replace("torch.", ""),
                    obj.get_memory_format().value)
            want = (list(shape), item["dtype"], item["fmt"])
            obj.ref_count_down()
            if meta != want:
                out[item["key"]] = f"metadata {meta} != {want}"
            elif got != expected(item["key"], nbytes):
                out[item["key"]] = "payload bytes differ"
            else:
                out[item["key"]] = "ok"
    if op == "put":  # one answered request after the unanswered PUTs: the server has them all
        assert run(conn.exists(parse_cache_key(spec[-1]["key"])))
    run(conn.close())
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
