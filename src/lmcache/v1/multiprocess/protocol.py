"""lmcache's MP protocol: request types, payloads, results and the msgpack wire codec.

One request is two ZMQ frames from a DEALER client to the server's ROUTER:
``msgpack([request_no, request_type])`` and ``msgpack(payloads)``; the reply is one frame
``msgpack([request_no, ok, result_or_error_text])``. Value types of
:mod:`lmcache.v1.multiprocess.custom_types` travel as msgpack ext types (codes below).

===========================  ==============================================  =====================
request type                 payloads                                        result
===========================  ==============================================  =====================
GET_CHUNK_SIZE               []                                              int (tokens)
REGISTER_KV_CACHE            [instance_id, KVCache]                          None
UNREGISTER_KV_CACHE          [instance_id]                                   None
STORE                        [keys, instance_id, block_ids, event_handle]    [event_handle, bool]
RETRIEVE                     [keys, instance_id, block_ids, event_handle,    [event_handle,
                              (skip_first_n_tokens per key, optional)]        [bool per key]]
LOOKUP                       [keys]                                          int (chunks hit)
FREE_LOOKUP_LOCKS            [key]                                           None
END_SESSION                  [request_id]                                    None
HEARTBEAT                    [instance_id, role]                             {"epoch", "chunk_size"}
REPORT_BLOCK_ALLOCATIONS     [records]                                       None
OFFLOAD                      [key, dtype, shape, kv bytes]                   int (tokens stored)
CLEAR                        []                                              None
CB_STORE                     [key, instance_id, block_ids, event_handle]     [event_handle, bool,
                                                                              segments stored]
CB_LOOKUP                    [key]                                           [[start, end,
                                                                              stored_start], ...]
CB_RETRIEVE                  [key, instance_id, block_ids, event_handle,     [event_handle,
                              ranges, rope]                                   [bool per range]]
===========================  ==============================================  =====================

``block_ids`` of STORE/RETRIEVE are the vLLM blocks of every key's ``[start, end)`` range, key
after key; ``event_handle`` is the CUDA IPC handle (bytes) of an event the client recorded
after the KV it wants stored/overwritten is ready (``b""``: nothing to wait for). A result's
event handle is empty when the server finished the copy before answering (lmcache's server
does). CLEAR (an administrator's or a benchmark's) drops every stored chunk of every tier.
A STORE/RETRIEVE that fails answers False (never an error), so the engine recomputes.
CB_* (CacheBlend, ``blend=cacheblend`` servers only: :mod:`lmcache.mp_server.blend_server`)
store / find / load segments between separator tokens at any position; ``ranges`` are
``[start, end]`` of CB_LOOKUP's answer, ``rope`` is ``{"rope_parameters": {...},
"is_neox_style": bool}``.
"""

from __future__ import annotations

import enum
from typing import Any

import msgpack

from lmcache.v1.multiprocess.custom_types import (
    CudaIPCWrapper, IPCCacheEngineKey, RequestAllocationRecord)

PROTOCOL_VERSION = 1


class RequestType(enum.IntEnum):
    """The MP protocol's requests (payloads and results: module table)."""

    GET_CHUNK_SIZE = 1
    REGISTER_KV_CACHE = 2
    UNREGISTER_KV_CACHE = 3
    STORE = 4
    RETRIEVE = 5
    LOOKUP = 6
    FREE_LOOKUP_LOCKS = 7
    END_SESSION = 8
    HEARTBEAT = 9
    REPORT_BLOCK_ALLOCATIONS = 10
    OFFLOAD = 11
    CLEAR = 12
    CB_STORE = 13
    CB_LOOKUP = 14
    CB_RETRIEVE = 15


_RESPONSE_CLASSES: dict[RequestType, Any] = {
    RequestType.GET_CHUNK_SIZE: int,
    RequestType.REGISTER_KV_CACHE: type(None),
    RequestType.UNREGISTER_KV_CACHE: type(None),
    RequestType.STORE: list,
    RequestType.RETRIEVE: list,
    RequestType.LOOKUP: int,
    RequestType.FREE_LOOKUP_LOCKS: type(None),
    RequestType.END_SESSION: type(None),
    RequestType.HEARTBEAT: dict,
    RequestType.REPORT_BLOCK_ALLOCATIONS: type(None),
    RequestType.OFFLOAD: int,
    RequestType.CLEAR: type(None),
    RequestType.CB_STORE: list,
    RequestType.CB_LOOKUP: list,
    RequestType.CB_RETRIEVE: list,
}

# The result a client uses when a request is lost (server gone, timeout): a miss, never KV.
_FAILURE_RESULTS: dict[RequestType, Any] = {
    RequestType.STORE: [b"", False],
    RequestType.RETRIEVE: [b"", [False]],
    RequestType.LOOKUP: 0,
    RequestType.OFFLOAD: 0,
    RequestType.CB_STORE: [b"", False, 0],
    RequestType.CB_LOOKUP: [],
    RequestType.CB_RETRIEVE: [b"", []],
}

_EXT = {1: IPCCacheEngineKey, 2: CudaIPCWrapper, 3: RequestAllocationRecord}
_EXT_CODE = {cls: code for code, cls in _EXT.items()}


def get_response_class(request_type: RequestType) -> Any:
    """The Python type of ``request_type``'s result. ValueError for an unknown type."""
    try:
        return _RESPONSE_CLASSES[RequestType(request_type)]
    except (KeyError, ValueError):
        raise ValueError(f"unknown MP request type {request_type!r}") from None


def failure_result(request_type: RequestType) -> Any:
    """The result standing for a lost request (lookup 0 hits, store/retrieve False), or None
    when the request has none (the caller then gets the error)."""
    return _FAILURE_RESULTS.get(RequestType(request_type))


def _default(obj: Any) -> Any:
    code = _EXT_CODE.get(type(obj))
    if code is None:
        if isinstance(obj, tuple):
            return list(obj)
        raise TypeError(f"the MP protocol cannot send a {type(obj).__name__}")
    return msgpack.ExtType(code, pack(obj.to_wire()))


def _ext_hook(code: int, data: bytes) -> Any:
    cls = _EXT.get(code)
    if cls is None:
        raise ValueError(f"unknown MP protocol ext type {code}")
    return cls.from_wire(unpack(data))


def pack(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` (custom types as ext types). TypeError for other objects."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """The object of :func:`pack`'s bytes. ValueError / msgpack errors for bad bytes."""
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
