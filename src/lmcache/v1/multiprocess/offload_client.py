"""OffloadClient: hand KV to lmcache's MP server by value, from any process (an engine without
a connector, a batch job, another framework). The server's OffloadServer stores it under the
same keys a vLLM instance of that model looks up (:mod:`lmcache.mp_server.offload_server`)."""

from __future__ import annotations

from typing import Optional

import torch
import zmq

from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey
from lmcache.v1.multiprocess.mq import MessageQueueClient
from lmcache.v1.multiprocess.protocol import RequestType


class OffloadClient:
    """Sends OFFLOAD requests.

    Args:
        server_url: the MP server, e.g. ``"tcp://localhost:5555"``.
        context: ZMQ context (default: the process's shared one).
        timeout: seconds one offload may take (None: forever).
    """

    def __init__(self, server_url: str, context: Optional[zmq.Context] = None,
                 timeout: Optional[float] = 60.0) -> None:
        self.timeout = timeout
        self._mq = MessageQueueClient(server_url, context or zmq.Context.instance(), timeout)

    def offload(self, model_name: str, token_ids: list[int], kv: torch.Tensor, start: int = 0,
                world_size: int = 1, worker_id: int = 0, cache_salt: str = "") -> int:
        """Store ``kv`` of tokens ``[start, len(token_ids))``; returns the tokens stored.

        Args:
            token_ids: the whole sequence (the prefix hash chain starts at token 0).
            kv: ``[2, num_layers, len(token_ids) - start, num_kv_heads, head_size]`` (K, V), any
                device and dtype; copied to host bytes (C order) here.
            start: first token of ``kv``; a multiple of the server's chunk size.

        Raises:
            ValueError: ``kv`` is not 5-D; MPRequestError: the server refused it (names why:
                shape, byte count, chunk alignment).
        """
        if not isinstance(kv, torch.Tensor) or kv.dim() != 5:
            raise ValueError(f"kv must be a 5-D tensor [2, layers, tokens, heads, head_size], "
                             f"got {getattr(kv, 'shape', type(kv).__name__)}")
        key = IPCCacheEngineKey(model_name, world_size, worker_id, tuple(int(t) for t in token_ids),
                                start, len(token_ids), None, cache_salt=cache_salt)
        host = kv.detach().contiguous().cpu()
        data = host.view(torch.uint8).numpy().tobytes() if host.dtype == torch.bfloat16 else \
            host.numpy().tobytes()
        dtype = str(host.dtype).removeprefix("torch.")
        return int(self._mq.submit_request(RequestType.OFFLOAD,
                                           [key, dtype, list(host.shape), data]).result(self.timeout))

    def close(self) -> None:
        self._mq.close()
