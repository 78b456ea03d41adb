"""BlendTransfers: the MP server's CB_STORE / CB_RETRIEVE work on its transfer thread.

Resolves the instance's registered KV cache, waits for the client's CUDA event and maps the
key's blocks to slots with the MP server's own code (:class:`KVTransfers`,
:class:`GPUCacheContext`), then hands the copy to :class:`BlendServer`. Every failure (unknown
instance, event timeout, bad blocks, a copy error) is a miss, answered False, never wrong KV;
malformed payloads raise ValueError naming them (the client gets the message).
"""

from __future__ import annotations

import logging

from lmcache.mp_server.blend_server import BlendServer
from lmcache.mp_server.kv_transfers import KVTransfers, _on_stream
from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey
from lmcache.v1.multiprocess.protocol import RequestType

logger = logging.getLogger(__name__)


class BlendTransfers:
    """Args: blend: the BlendServer; transfers: the MP server's KVTransfers (sessions, event
    waits, streams, counters)."""

    def __init__(self, blend: BlendServer, transfers: KVTransfers) -> None:
        self.blend = blend
        self.transfers = transfers

    def run(self, rtype: RequestType, payloads: list) -> list:
        """CB_STORE ``[key, instance_id, block_ids, event_handle]`` -> ``[b"", ok, segments
        newly stored]``; CB_RETRIEVE ``[key, instance_id, block_ids, event_handle, ranges,
        rope]`` -> ``[b"", [bool per range]]``.

        Raises:
            ValueError: wrong payload count, a key that is not one token-mode key, bad
                ranges or rope (named).
        """
        store = rtype is RequestType.CB_STORE
        want = 4 if store else 6
        if not isinstance(payloads, list) or len(payloads) != want:
            raise ValueError(f"{rtype.name} takes {want} payloads, got {payloads!r:.200}")
        key, instance_id, block_ids, handle = payloads[:4]
        if not isinstance(key, IPCCacheEngineKey) or not key.is_token_mode:
            raise ValueError(f"{rtype.name} takes one token-mode IPCCacheEngineKey, got "
                             f"{type(key).__name__}")
        ranges = payloads[4] if not store else None
        miss = [b"", False, 0] if store else [b"", [False] * len(ranges or ())]
        t = self.transfers
        session = t.sessions.instance(int(instance_id))
        if session is None:
            t.counters["unknown_instance"] += 1
            logger.warning("lmcache MP server: %s from instance %s, which has no registered "
                           "KV cache: answered False", rtype.name, instance_id)
            return miss
        ctx = session.ctx
        kv_caches = ctx.kv_caches
        if not t._wait_event(handle, ctx, int(instance_id), session) \
                or t.sessions.instance(int(instance_id)) is not session:
            return miss
        start, end = key.token_range()
        try:
            slots = ctx.slots(list(block_ids), end - start)
        except ValueError as e:
            logger.warning("lmcache MP server: %s of request %s: %s", rtype.name,
                           key.request_id, e)
            if not store and key.request_id is not None:
                self.blend.unpin(key.request_id)
            return miss
        stream = t._stream(ctx.device)
        with _on_stream(stream):
            if store:
                new = self.blend.store(key, slots, kv_caches, ctx.layout)
                result = [b"", True, new]
            else:
                result = [b"", self.blend.retrieve(key, ranges, slots, kv_caches, ctx.layout,
                                                   payloads[5])]
        if stream is not None:
            stream.synchronize()
        return result
