"""The ``lm://`` protocol: fixed little-endian headers shared by LMCacheServer and LMConnector.

Every request is a 20-byte header, then the key, then the value (PUT only)::

    REQUEST  = struct "<4sBBHIQ": magic b"LMCQ", version 1, op, reserved 0,
                                  key_len (uint32), value_len (uint64)

Every reply is a 16-byte header, then the value (GET hit, or an ERROR message)::

    RESPONSE = struct "<4sBBHQ":  magic b"LMCR", version 1, status, reserved 0,
                                  value_len (uint64)

Ops: PUT 1 (store value under key), GET 2 (value or NOT_FOUND), EXISTS 3 (OK or NOT_FOUND),
REMOVE 4 (OK or NOT_FOUND), PING 5 (OK). Status: OK 0, NOT_FOUND 1, ERROR 2 (value = UTF-8
message), TOO_LARGE 3 (value above the server's limit; nothing stored).

Keys are UTF-8 strings of 1..MAX_KEY_BYTES bytes; values are opaque to the server (the
connector stores ``wire_format`` blobs: magic, 36-byte metadata, payload). Both sides check
every length against their limits *before* reading the bytes it announces; a bad magic,
version or op closes the connection. Nothing is ever unpickled.
"""

from __future__ import annotations

import socket
import struct
from enum import IntEnum

REQUEST = struct.Struct("<4sBBHIQ")
RESPONSE = struct.Struct("<4sBBHQ")
REQUEST_MAGIC = b"LMCQ"
RESPONSE_MAGIC = b"LMCR"
VERSION = 1
MAX_KEY_BYTES = 4096


class Op(IntEnum):
    """Request operations."""

    PUT = 1
    GET = 2
    EXISTS = 3
    REMOVE = 4
    PING = 5


class Status(IntEnum):
    """Reply statuses."""

    OK = 0
    NOT_FOUND = 1
    ERROR = 2
    TOO_LARGE = 3


class ProtocolError(ValueError):
    """Bytes that are not a valid header of this protocol."""


def pack_request(op: Op, key: bytes, value_len: int = 0) -> bytes:
    """Request header followed by the key bytes.

    Raises:
        ValueError: key empty or longer than MAX_KEY_BYTES, negative value_len.
    """
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"key is {len(key)} bytes; expected 1..{MAX_KEY_BYTES}")
    if value_len < 0:
        raise ValueError(f"value_len must be >= 0, got {value_len}")
    return REQUEST.pack(REQUEST_MAGIC, VERSION, int(op), 0, len(key), value_len) + key


def unpack_request(header: bytes, max_value_bytes: int) -> tuple[Op, int, int]:
    """(op, key_len, value_len) of a request header.

    Raises:
        ProtocolError: bad magic, version or op, key length outside 1..MAX_KEY_BYTES, or a
            non-PUT with a value. A PUT larger than ``max_value_bytes`` is *not* an error here
            (the server answers TOO_LARGE after draining it).
    """
    magic, version, op, _, key_len, value_len = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC or version != VERSION:
        raise ProtocolError(f"bad request magic/version {magic!r}/{version}")
    try:
        op = Op(op)
    except ValueError:
        raise ProtocolError(f"unknown op {op}") from None
    if not 0 < key_len <= MAX_KEY_BYTES:
        raise ProtocolError(f"key length {key_len} outside 1..{MAX_KEY_BYTES}")
    if op != Op.PUT and value_len:
        raise ProtocolError(f"{op.name} request carries a {value_len}-byte value")
    return op, key_len, value_len


def pack_response(status: Status, value_len: int = 0) -> bytes:
    """Reply header."""
    return RESPONSE.pack(RESPONSE_MAGIC, VERSION, int(status), 0, value_len)


def unpack_response(header: bytes, max_value_bytes: int) -> tuple[Status, int]:
    """(status, value_len) of a reply header.

    Raises:
        ProtocolError: bad magic/version/status or value_len above ``max_value_bytes``.
    """
    magic, version, status, _, value_len = RESPONSE.unpack(header)
    if magic != RESPONSE_MAGIC or version != VERSION:
        raise ProtocolError(f"bad response magic/version {magic!r}/{version}")
    try:
        status = Status(status)
    except ValueError:
        raise ProtocolError(f"unknown status {status}") from None
    if value_len > max_value_bytes:
        raise ProtocolError(f"reply announces {value_len} bytes, limit {max_value_bytes}")
    return status, value_len


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Read exactly ``n`` bytes. ConnectionError when the peer closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += k
    return buf
