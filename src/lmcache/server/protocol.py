"""The ``lm://`` wire protocol: LMCache 0.5.6's cache-server protocol, plus opt-in extensions.

Source of the format: LMCache 0.5.6 ``lmcache/v1/protocol.py`` (``ClientMetaMessage``,
``ServerMetaMessage``) and ``lmcache/v1/server/__main__.py`` (what the server answers). All
integers are little-endian int32.

Every request is 186 bytes (``REQUEST``), then the value (PUT only)::

    command, length, fmt, dtype code, location, shape[0..3], key (150 bytes, UTF-8, space-padded)

Every reply is 36 bytes (``REPLY``), then the value (GET hit only)::

    code, length, fmt, dtype code, shape[0..3], location

LMCache's commands: PUT 1 (no reply at all), GET 2, EXIST 3, LIST 4 (ignored: no reply),
HEALTH 5. Codes: SUCCESS 200, FAIL 400. ``fmt`` is a MemoryFormat value, ``dtype`` a wire dtype
code (the codes of LMCache's ``RemoteMetadata``), shapes are padded to 4 dims with 0. The
server keeps fmt/dtype/shape of a PUT and hands them back on GET; ``length`` is the value size
in bytes (so a value is < 2 GiB).

lmcache extensions, used only between lmcache's connector and lmcache's server, and only after
a HELLO that the server acknowledged (LMCache's server never sees an extension command):

* HELLO: a HEALTH whose key is ``lmcache-hello@1@0@0@half`` (optionally ``@token%<token>``;
  LMCache's server parses it as an ordinary key and answers SUCCESS). lmcache's server answers
  SUCCESS with ``length = EXT_MAGIC`` and ``location = EXT_VERSION``, or UNAUTHORIZED (then
  closes) when it requires a token and this one is missing or wrong.
* X_PUT: like PUT, but ``location`` = number of *extra* bytes (0..MAX_EXTRA_BYTES, lmcache's
  checksum) sent between the header and the value, and it is answered: SUCCESS, TOO_LARGE (value
  above the server's limit), BUSY (in-flight byte budget exhausted); nothing is stored then.
* X_GET: like GET; the reply's ``location`` is the number of extra bytes sent before the value
  (0 for an entry written by an LMCache client).
* X_REMOVE: SUCCESS when the key was deleted, FAIL when absent.

A server that requires a token accepts nothing but a HELLO as the first message, so an LMCache
client (which cannot send one) is refused. Keys are at most MAX_KEY_BYTES (LMCache's limit).
Nothing here is ever unpickled.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from enum import IntEnum
from typing import NamedTuple, Optional, Union

REQUEST = struct.Struct("<9i150s")
REPLY = struct.Struct("<9i")
MAX_KEY_BYTES = 150
MAX_EXTRA_BYTES = 64
MAX_VALUE_BYTES = (1 << 31) - 1  # ``length`` is an int32
EXT_MAGIC = 0x4C4D4558  # b"XEML" little-endian: "LMEX"
EXT_VERSION = 1
HELLO_KEY = "lmcache-hello@1@0@0@half"
TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/=-]{1,100}")
_EMPTY_SHAPE = (0, 0, 0, 0)

Buffer = Union[bytes, bytearray, memoryview]


class Command(IntEnum):
    """Request commands: LMCache's (1..5) and lmcache's extensions."""

    PUT = 1
    GET = 2
    EXIST = 3
    LIST = 4
    HEALTH = 5
    X_PUT = 0x4C4D0001
    X_GET = 0x4C4D0002
    X_REMOVE = 0x4C4D0003


class Code(IntEnum):
    """Reply codes: LMCache's SUCCESS/FAIL and lmcache's extension codes."""

    SUCCESS = 200
    FAIL = 400
    UNAUTHORIZED = 401
    TOO_LARGE = 413
    BUSY = 503


class ProtocolError(ValueError):
    """Bytes that are not a valid message of this protocol."""


class Request(NamedTuple):
    """A parsed request header."""

    command: Command
    length: int
    fmt: int
    dtype: int
    location: int
    shape: tuple[int, int, int, int]
    key: bytes


class Reply(NamedTuple):
    """A parsed reply header."""

    code: Code
    length: int
    fmt: int
    dtype: int
    shape: tuple[int, int, int, int]
    location: int


def check_token(token: Optional[str]) -> Optional[str]:
    """``token`` itself when None or valid (1..100 of ``A-Za-z0-9._~+/=-``).

    Raises:
        ValueError: any other value (the message does not repeat the token).
    """
    if token is not None and (not isinstance(token, str) or not TOKEN_RE.fullmatch(token)):
        raise ValueError("lm:// token must be 1..100 characters of A-Za-z0-9._~+/=-")
    return token


def hello_key(token: Optional[str]) -> bytes:
    """The HELLO key, carrying ``token`` as an LMCache tag when given."""
    return (HELLO_KEY if token is None else f"{HELLO_KEY}@token%{token}").encode()


def token_of_hello(key: bytes) -> Optional[str]:
    """The token carried by a HELLO key; None when it carries none. Precondition: is_hello."""
    rest = key[len(HELLO_KEY):]
    return rest[len(b"@token%"):].decode("utf-8", "replace") if rest else None


def is_hello(key: bytes) -> bool:
    """Whether a HEALTH request's key is lmcache's HELLO."""
    return key == HELLO_KEY.encode() or key.startswith(HELLO_KEY.encode() + b"@token%")


def pack_request(command: Command, key: bytes, length: int = 0, fmt: int = 1, dtype: int = 2,
                 shape: tuple[int, ...] = _EMPTY_SHAPE, location: int = 0) -> bytes:
    """A 186-byte request header (non-PUT requests carry LMCache's filler fmt 1 / dtype 2).

    Raises:
        ValueError: key empty, longer than MAX_KEY_BYTES or containing whitespace; a length
            outside 0..MAX_VALUE_BYTES; a shape of other than 4 slots.
    """
    if not 0 < len(key) <= MAX_KEY_BYTES or key != key.strip() or b" " in key:
        raise ValueError(f"lm:// key is {len(key)} bytes or has whitespace; "
                         f"expected 1..{MAX_KEY_BYTES} bytes without spaces: {key[:40]!r}")
    if not 0 <= length <= MAX_VALUE_BYTES:
        raise ValueError(f"value of {length} bytes; lm:// carries 0..{MAX_VALUE_BYTES}")
    if len(shape) != 4:
        raise ValueError(f"shape must have 4 slots, got {shape}")
    return REQUEST.pack(int(command), length, fmt, dtype, location, *shape,
                        key.ljust(MAX_KEY_BYTES))


def unpack_request(header: Buffer) -> Request:
    """Parse a request header.

    Raises:
        ProtocolError: unknown command, negative length or location, empty key.
    """
    command, length, fmt, dtype, location, s0, s1, s2, s3, key = REQUEST.unpack(header)
    try:
        command = Command(command)
    except ValueError:
        raise ProtocolError(f"unknown command {command}") from None
    key = key.strip()
    if length < 0 or location < 0 or not key:
        raise ProtocolError(f"bad {command.name} header: length {length}, location "
                            f"{location}, key {key[:40]!r}")
    return Request(command, length, fmt, dtype, location, (s0, s1, s2, s3), key)


def pack_reply(code: Code, length: int = 0, fmt: int = 1, dtype: int = 2,
               shape: tuple[int, ...] = _EMPTY_SHAPE, location: int = 0) -> bytes:
    """A 36-byte reply header (defaults are LMCache's filler fields of an empty reply)."""
    return REPLY.pack(int(code), length, fmt, dtype, *shape, location)


def unpack_reply(header: Buffer) -> Reply:
    """Parse a reply header.

    Raises:
        ProtocolError: unknown code, negative length or location.
    """
    code, length, fmt, dtype, s0, s1, s2, s3, location = REPLY.unpack(header)
    try:
        code = Code(code)
    except ValueError:
        raise ProtocolError(f"unknown reply code {code}") from None
    if length < 0 or location < 0:
        raise ProtocolError(f"bad reply: length {length}, location {location}")
    return Reply(code, length, fmt, dtype, (s0, s1, s2, s3), location)


def recv_into(sock: socket.socket, view: memoryview, deadline: Optional[float] = None,
              step_timeout: Optional[float] = None) -> None:
    """Fill ``view`` from ``sock``.

    Each wait for bytes lasts at most ``step_timeout`` seconds (None: the socket's timeout),
    and the whole read ends by ``deadline`` (time.monotonic(); None: no deadline).

    Raises:
        ConnectionError: the peer closed first.
        TimeoutError: a wait or the deadline ran out.
    """
    got, n = 0, view.nbytes
    while got < n:
        if deadline is not None or step_timeout is not None:
            wait = step_timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"read deadline passed after {got} of {n} bytes")
                wait = left if wait is None else min(wait, left)
            sock.settimeout(wait)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += k


def recv_exact(sock: socket.socket, n: int, **kw) -> bytearray:
    """Read exactly ``n`` bytes into a new bytearray (see recv_into for ``kw`` and errors)."""
    buf = bytearray(n)
    recv_into(sock, memoryview(buf), **kw)
    return buf


def send_all(sock: socket.socket, data: Buffer, step_timeout: float, deadline: float,
             piece: int = 4 << 20) -> None:
    """Send all of ``data`` in pieces of ``piece`` bytes, straight from its buffer (no copy).

    Each wait for the peer lasts at most ``step_timeout`` seconds and the whole send ends by
    ``deadline`` (time.monotonic()).

    Raises:
        TimeoutError: a wait or the deadline ran out. OSError: the connection broke.
    """
    view = memoryview(data).cast("B")
    sent, n = 0, view.nbytes
    while sent < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"write deadline passed after {sent} of {n} bytes")
        sock.settimeout(min(step_timeout, left))
        sent += sock.send(view[sent:sent + piece])
