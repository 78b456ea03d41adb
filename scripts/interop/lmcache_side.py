"""The LMCache 0.5.6 side of the interop suite: runs inside ``.venv-interop`` (real ``lmcache``
from PyPI), one action per process, JSON request in argv[1], JSON answer on the last stdout line.

Actions:
    key     -- LMCache's CacheEngineKey(...).to_string()
    hashes  -- key strings of LMCache's ChunkedTokenDatabase.process_tokens(tokens)
    put     -- write one chunk (bytes from a file) through LMCache's own remote connector
    get     -- read one chunk through LMCache's connector; bytes to a file, shape/dtype/fmt back
    config  -- does LMCacheEngineConfig.from_file accept the file (and the keys it keeps)

LMCache's connectors get a stand-in for its LocalCPUBackend that allocates with LMCache's own
AdHocMemoryAllocator (plain CPU tensors: no pinned memory on a CPU-only machine); everything
else (connector, RemoteMetadata, key strings, token database) is LMCache's code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading

logging.disable(logging.WARNING)


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
            "uint8": torch.uint8}[name]


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _metadata(req):
    from lmcache.v1.metadata import LMCacheMetadata

    L, H, D, C = req["layers"], req["heads"], req["head_size"], req["chunk_size"]
    return LMCacheMetadata(model_name=req.get("model", "org/model"), world_size=1,
                           local_world_size=1, worker_id=0, local_worker_id=0,
                           kv_dtype=_dtype(req["dtype"]), kv_shape=(L, 2, C, H, D),
                           use_mla=False, chunk_size=C)


def _config(req):
    from lmcache.v1.config import LMCacheEngineConfig

    kw = dict(chunk_size=req.get("chunk_size", 256), remote_url=req.get("url"),
              remote_serde="naive", save_unfull_chunk=req.get("save_unfull_chunk", False),
              use_layerwise=req.get("layerwise", False), blocking_timeout_secs=10)
    if "algo" in req:
        kw["pre_caching_hash_algorithm"] = req["algo"]
    if req.get("extra_config"):
        kw["extra_config"] = req["extra_config"]
    return LMCacheEngineConfig.from_defaults(**kw)


class _CPUStandIn:
    """What LMCache's remote connectors use of a LocalCPUBackend: config, metadata, allocate."""

    def __init__(self, config, metadata):
        from lmcache.v1.memory_allocators.ad_hoc_memory_allocator import AdHocMemoryAllocator

        self.config, self.metadata = config, metadata
        self._alloc = AdHocMemoryAllocator("cpu")

    def allocate(self, shapes, dtypes, fmt=None, *args, **kwargs):
        return self._alloc.allocate(shapes, dtypes, fmt)


def _connector(req):
    from lmcache.v1.storage_backend.connector import CreateConnector

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    config, metadata = _config(req), _metadata(req)
    conn = CreateConnector(req["url"], loop, _CPUStandIn(config, metadata), config, metadata)
    return conn, loop


def _nbytes(obj) -> int:
    shape = obj.get_shape()
    n = obj.get_dtype().itemsize
    for d in shape:
        n *= d
    return n


def _key(s: str):
    from lmcache.utils import parse_cache_key

    return parse_cache_key(s)


def action_key(req):
    from lmcache.utils import CacheEngineKey

    key = CacheEngineKey(req["model"], req["world_size"], req["worker_id"], req["chunk_hash"],
                         _dtype(req["dtype"]), request_configs=req.get("request_configs") or {})
    return {"key": key.to_string()}


def action_hashes(req):
    from lmcache.v1.token_database import ChunkedTokenDatabase

    db = ChunkedTokenDatabase(_config(req), _metadata(req))
    return {"keys": [k.to_string() for _, _, k in db.process_tokens(tokens=req["tokens"])]}


def action_put(req):
    import torch
    from lmcache.v1.memory_management import MemoryFormat

    conn, loop = _connector(req)
    data = open(req["data"], "rb").read()
    shape, dtype = torch.Size(req["shape"]), _dtype(req["dtype"])
    obj = _CPUStandIn(None, None).allocate([shape], [dtype], MemoryFormat(req["fmt"]))
    obj.raw_data.view(-1)[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    asyncio.run_coroutine_threadsafe(conn.put(_key(req["key"]), obj), loop).result(30)
    return {"ok": True}


def action_get(req):
    conn, loop = _connector(req)
    obj = asyncio.run_coroutine_threadsafe(conn.get(_key(req["key"])), loop).result(30)
    out = {"hit": obj is not None}
    if obj is not None:
        with open(req["out"], "wb") as f:
            f.write(obj.raw_data.view(-1)[: _nbytes(obj)].numpy().tobytes())
        out.update(shape=list(obj.get_shape()), dtype=_name(obj.get_dtype()),
                   fmt=obj.get_memory_format().value)
    return out


def action_config(req):
    from lmcache.v1.config import LMCacheEngineConfig

    try:
        cfg = LMCacheEngineConfig.from_file(req["path"])
    except Exception as e:  # what LMCache refuses
        return {"accepted": False, "error": f"{type(e).__name__}: {e}"[:300]}
    return {"accepted": True, "chunk_size": cfg.chunk_size, "remote_url": cfg.remote_url}


def main() -> None:
    req = json.loads(sys.argv[1])
    out = globals()["action_" + req["action"]](req)
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # LMCache leaves non-daemon threads behind


if __name__ == "__main__":
    main()
