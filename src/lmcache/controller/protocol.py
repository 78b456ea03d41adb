"""Wire format between LMCacheWorkers, P2P backends and the CacheController.

Every message is one msgpack map with an ``"op"`` string (LMCache's message names, lower case):

* worker → controller, REQ/REP on ``controller_reply_url``: ``register``, ``heartbeat``,
  ``deregister``, ``p2p_lookup``; the reply is a map (``{"error": str}`` on failure).
* worker → controller, PUSH/PULL on ``controller_pull_url``: ``kv_ops`` (a batch of admit/evict
  events of one tier: ``ops = [[ADMIT|EVICT, chunk_hash], ...]``) and ``full_sync`` (every
  chunk hash a tier holds, replacing what the controller knew of it).
* controller → worker, REQ/REP on the worker's port (``lmcache_worker_ports``): ``clear``,
  ``pin``, ``move``, ``health``.

Messages are parsed with size limits (:data:`MAX_MESSAGE_BYTES`) and a map type check; a
malformed message is answered with an error (REQ/REP) or dropped and counted (PUSH), never
trusted.
"""

from __future__ import annotations

from typing import Any

import msgpack

ADMIT, EVICT = 0, 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a full sync of ~4M chunk hashes


class ProtocolError(ValueError):
    """A message that is not a msgpack map with a string ``op`` (or is too large)."""


def encode(msg: dict[str, Any]) -> bytes:
    """A message as msgpack bytes."""
    return msgpack.packb(msg, use_bin_type=True)


def decode(data: bytes, reply: bool = False) -> dict[str, Any]:
    """Parse one message (a request; ``reply=True``: a reply, which has no ``op``).

    Raises:
        ProtocolError: larger than :data:`MAX_MESSAGE_BYTES`, not msgpack, not a map, or
            (a request) without a string ``op``.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a protocol error
        raise ProtocolError(f"not a msgpack message: {e}") from None
    if isinstance(msg, dict) and reply:
        return msg
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError(f"expected a map with a string 'op', got {type(msg).__name__}")
    return msg


def tcp_url(url: str, what: str) -> str:
    """LMCache's ``host:port`` (or ``tcp://host:port``) as a ZMQ ``tcp://host:port`` URL.

    Raises:
        ValueError: not ``host:port`` with a port in 1..65535 (the message names ``what``).
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"{what} must be 'host:port', got {url!r}")
    body = url[len("tcp://"):] if url.startswith("tcp://") else url
    host, sep, port = body.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be 'host:port' with a port in 1..65535, got {url!r}")
    return f"tcp://{host}:{int(port)}"


def worker_key(instance_id: str, worker_id: int) -> str:
    """One string naming a worker of an instance (``instance_id`` may hold any character)."""
    return f"{instance_id}\x1f{int(worker_id)}"


def split_worker_key(key: str) -> tuple[str, int]:
    instance_id, _, worker_id = key.rpartition("\x1f")
    return instance_id, int(worker_id)
