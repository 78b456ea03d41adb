"""OffloadServer: KV store requests from any process (an engine without a connector).

A process that holds KV in memory (any framework, any device) sends it by value over ZMQ with
an OFFLOAD request — ``[key, dtype name, shape [2, L, T, H, D], raw bytes]`` (K then V, layers,
the T tokens of the key's ``[start, end)`` range, heads, head size; C order) — and the MP server
stores it through the same engine and tiers as the KV of registered vLLM instances, under the
same keys (model, world size, worker, chunk hashes of the token ids). A vLLM instance of that
model then finds it with LOOKUP and loads it with RETRIEVE. Answers the number of tokens stored.
"""

from __future__ import annotations

import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey, dtype_from_name


class OffloadServer:
    """Handles OFFLOAD requests for the MP server (runs on its transfer thread).

    Args:
        engine_pool: the server's EnginePool (the offload engine shares its storage manager).
    """

    def __init__(self, engine_pool) -> None:
        self.pool = engine_pool

    def handle(self, payloads: list) -> int:
        """Store one offloaded KV block; returns tokens stored (chunks already cached and a
        trailing partial chunk, unless save_unfull_chunk, are not counted).

        Raises:
            ValueError: a hash-mode key, a shape that is not ``[2, L, end - start, H, D]``, a
                byte count that does not match shape and dtype, or a range not starting on a
                chunk boundary.
        """
        key, dtype_name, shape, data = payloads
        if not isinstance(key, IPCCacheEngineKey):
            raise ValueError(f"OFFLOAD needs an IPCCacheEngineKey, got {type(key).__name__}")
        start, end = key.token_range()
        dtype = dtype_from_name(dtype_name)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 5 or shape[0] != 2 or shape[2] != end - start:
            raise ValueError(f"OFFLOAD shape must be [2, layers, {end - start} tokens, heads, "
                             f"head_size] for key range [{start}, {end}), got {list(shape)}")
        if start % self.pool.chunk_size:
            raise ValueError(f"OFFLOAD range start {start} is not a multiple of chunk_size "
                             f"{self.pool.chunk_size}")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        want = itemsize * shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
        if len(data) != want:
            raise ValueError(f"OFFLOAD data has {len(data)} bytes, shape {list(shape)} of "
                             f"{dtype_name} needs {want}")
        _, layers, count, heads, head_size = shape
        kv = torch.frombuffer(bytearray(data), dtype=dtype).view(shape)
        # Each layer as a paged cache of one-token blocks: [2, B=T, N=1, H, D] (legacy_5d).
        kvcaches = [kv[:, layer].unsqueeze(2) for layer in range(layers)]
        layout = KVCacheLayout("legacy_5d", block_size=1, num_kv_heads=heads, head_size=head_size)
        engine = self.pool.engine(key.model_name, key.world_size, key.worker_id or 0, layout,
                                  dtype, layers)
        tokens = key.token_tensor(end)
        mask = torch.zeros(end, dtype=torch.bool)
        mask[start:] = True
        slots = torch.full((end,), -1, dtype=torch.int64)
        slots[start:] = torch.arange(count)
        return int(engine.store(tokens, mask, kvcaches=kvcaches, slot_mapping=slots,
                                request_configs=key.request_configs()))
