"""Wire format shared by LookupClient and LookupServer.

Each message is one msgpack map (msgpack spec, https://msgpack.org). Requests:

- ``{"op": "lookup", "id": str, "tokens": bytes, "pin": bool, "tags": {str: str}}`` where ``tokens``
  is the little-endian int64 array of the prompt's token ids. Reply ``{"hit": int}`` (tokens).
- ``{"op": "unpin", "id": str}``. Reply ``{"ok": true}``.

Any failure is answered ``{"error": str}``. Messages larger than ``MAX_MESSAGE_BYTES`` are refused.
"""

from __future__ import annotations

import os
import tempfile

import msgpack
import numpy as np

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # 8M tokens of int64


def lookup_address(engine_id: str, rank: int, base_dir: str | None = None) -> str:
    """The ZMQ ipc:// endpoint of worker ``rank``'s LookupServer for vLLM engine ``engine_id``.

    Both sides derive it from the same ``kv_transfer_config.engine_id`` (a UUID vLLM shares
    between scheduler and workers), so no port needs configuring.
    """
    if not engine_id or any(c in engine_id for c in "/\\\0"):
        raise ValueError(f"engine_id {engine_id!r} must be a non-empty name without path separators")
    base = base_dir or os.environ.get("LMCACHE_IPC_DIR") or tempfile.gettempdir()
    return f"ipc://{os.path.join(base, f'lmcache-lookup-{engine_id}-{rank}.ipc')}"


def encode_tokens(tokens) -> bytes:
    """Token ids (list[int] or 1-D integer tensor/array) → little-endian int64 bytes."""
    if hasattr(tokens, "cpu"):
        tokens = tokens.cpu().numpy()
    return np.asarray(tokens, dtype="<i8").tobytes()


def decode_tokens(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_tokens`; ValueError when the length is not a multiple of 8."""
    if len(data) % 8:
        raise ValueError(f"token payload of {len(data)} bytes is not a multiple of 8 (int64)")
    return np.frombuffer(data, dtype="<i8")


def pack(msg: dict) -> bytes:
    """Serialise one message with msgpack."""
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes) -> dict:
    """Parse one message with size limits; ValueError when it is too large or not a map."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"lookup message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    msg = msgpack.unpackb(data, raw=False, max_bin_len=MAX_MESSAGE_BYTES, max_str_len=1 << 20)
    if not isinstance(msg, dict):
        raise ValueError(f"lookup message must be a map, got {type(msg).__name__}")
    return msg
