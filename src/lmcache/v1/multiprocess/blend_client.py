"""The engine side of the BlendServer's CB_STORE / CB_LOOKUP / CB_RETRIEVE requests.

Used through lmcache's MP adapter (``LMCacheMPWorkerAdapter.cb_store`` / ``cb_lookup`` /
``cb_retrieve``; scheduler adapters have ``cb_lookup``). Calls are synchronous (answered within
the adapter's ``mq_timeout``). The server only moves and re-positions KV; which tokens the
engine recomputes (CacheBlend's selection) stays with the engine, as in LMCache.

Faults: a server that is not connected or a lost request (timeout, server gone) is a miss
(0 segments stored, no segments found, False per range); a request the server refuses (a
malformed payload, a server without ``blend=cacheblend``, a failed copy) raises
:class:`MPRequestError` with the server's reason (names the bad value).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from lmcache.v1.multiprocess.protocol import RequestType

logger = logging.getLogger(__name__)


def _handle(event: Any) -> bytes:
    return b"" if event is None else bytes(event.ipc_handle())


def _call(adapter, rtype: RequestType, payloads: list, miss: Any) -> Any:
    future = adapter._send(rtype, payloads)
    if future is None:
        return miss  # not connected: a miss
    try:
        return future.result(adapter.mq_client.timeout)
    except TimeoutError:
        logger.warning("LMCache %s not answered in time: a miss", rtype.name)
        return miss


def _instance(adapter) -> int:
    instance_id = getattr(adapter, "instance_id", None)
    if instance_id is None:
        raise ValueError("CB store/retrieve need a worker adapter (one that registered its "
                         "KV caches); this adapter has no instance_id")
    return instance_id


def cb_store(adapter, token_ids: Sequence[int], block_ids: Sequence[int], event: Any = None,
             request_id: Optional[str] = None, cache_salt: str = "") -> int:
    """Store every segment of ``token_ids`` (whose KV is in ``block_ids``, token t in block
    ``block_ids[t // block_size]``) that the server does not hold yet.

    Args:
        event: a CUDA event recorded after the KV was written (None on CPU).

    Returns:
        segments newly stored (0 when all were cached, or on a miss).
    """
    key = adapter._key(token_ids, 0, len(token_ids), request_id, cache_salt)
    ok = _call(adapter, RequestType.CB_STORE,
               [key, _instance(adapter), list(block_ids), _handle(event)], [b"", False, 0])
    return int(ok[2]) if ok[1] else 0


def cb_lookup(adapter, request_id: str, token_ids: Sequence[int],
              cache_salt: str = "") -> list[tuple[int, int, int]]:
    """Cached segments of ``token_ids`` at any position: ``[(start, end, stored_start)]``
    (token ranges of this prompt, in order; pinned until ``cb_retrieve`` or END_SESSION)."""
    key = adapter._key(token_ids, 0, len(token_ids), request_id, cache_salt)
    return [tuple(r) for r in _call(adapter, RequestType.CB_LOOKUP, [key], [])]


def cb_retrieve(adapter, request_id: str, token_ids: Sequence[int], block_ids: Sequence[int],
                ranges: Sequence[Sequence[int]], rope_parameters: Optional[dict] = None,
                is_neox_style: bool = True, event: Any = None,
                cache_salt: str = "") -> list[bool]:
    """Load the segments at ``ranges`` (``[start, end]`` of :func:`cb_lookup`) into the
    blocks of ``token_ids`` (``block_ids`` as for :func:`cb_store`), K re-positioned from
    where each segment was stored to its range here; other slots untouched.

    Args:
        rope_parameters: the model's RoPE (``rope_theta``, ``rope_type``, ... as vLLM's
            ``get_rope`` reads them); None = default RoPE, theta 10000.
        is_neox_style: neox (halves) or gptj (interleaved) rotation.
        event: a CUDA event after which the blocks may be overwritten (None on CPU).

    Returns:
        one bool per range (False: a miss; the engine recomputes those tokens).
    """
    ranges = [[int(s), int(e)] for s, e, *_ in ranges]
    key = adapter._key(token_ids, 0, len(token_ids), request_id, cache_salt)
    rope = {"rope_parameters": dict(rope_parameters or {}), "is_neox_style": bool(is_neox_style)}
    ok = _call(adapter, RequestType.CB_RETRIEVE,
               [key, _instance(adapter), list(block_ids), _handle(event), ranges, rope],
               [b"", []])
    got = list(ok[1]) if isinstance(ok, list) and len(ok) > 1 else []
    return [bool(got[i]) if i < len(got) else False for i in range(len(ranges))]
