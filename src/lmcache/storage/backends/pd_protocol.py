"""Control messages of disaggregated prefill (PD): msgpack maps over ZMQ REQ/REP.

Init port (the decoder binds REP):   {"op": "hello", "md": <sender channel metadata>}
                                      -> {"ok": true, "md": <decoder channel metadata>}
Alloc port (the decoder binds REP):  {"op": "alloc", "id": str, "keys": [str], "shapes": [[int]],
                                      "dtype": str, "fmt": int}
                                      -> {"ok": true, "offsets": [int]}: one per key in order, -1 =
                                         the decoder already holds that chunk (nothing to write),
                                         >= 0 = byte offset in the decoder's region 0; a shorter
                                         list = the buffer is full for the rest.
                                     {"op": "commit", "id": str}  (after the channel write, whose
                                         notification carries the same id)
                                      -> {"ok": true, "stored": int} once the chunks are visible
                                         to the decoder's lookups, or {"ok": false, "error": str}.
Every reply may be {"ok": false, "error": str}. Messages are parsed with size limits.
"""

from __future__ import annotations

from typing import Any, Optional

import msgpack
import zmq

MAX_MESSAGE_BYTES = 64 << 20
MAX_KEYS = 1 << 16


def pack(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(raw: bytes) -> dict:
    """A message map; ValueError when it is not one."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ValueError(f"PD message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_MESSAGE_BYTES,
                              max_array_len=MAX_KEYS, max_map_len=32)
    except Exception as e:  # msgpack raises several types
        raise ValueError(f"PD message is not msgpack: {e}") from None
    if not isinstance(msg, dict):
        raise ValueError("PD message is not a map")
    return msg


def tcp(host: str, port: int) -> str:
    return f"tcp://{host}:{int(port)}"


def port_of(port: Any, worker_id: int, key: str) -> Optional[int]:
    """LMCache's per-rank ports: an int, or a list with one port per worker (TP rank)."""
    if port is None:
        return None
    if isinstance(port, (list, tuple)):
        if worker_id >= len(port):
            raise ValueError(f"{key}={list(port)} has no port for worker {worker_id}")
        port = port[worker_id]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{key} must be a port (1..65535) or a list of ports, got {port!r}")
    return port


class ReqClient:
    """A REQ socket with a deadline per round trip; rebuilt after a timeout (REQ cannot go on)."""

    def __init__(self, ctx: zmq.Context, address: str, timeout_s: float):
        self.ctx, self.address, self.timeout_ms = ctx, address, max(1, int(timeout_s * 1000))
        self.sock: Optional[zmq.Socket] = None

    def call(self, msg: dict, timeout_s: Optional[float] = None) -> dict:
        """Send and wait for the reply; TimeoutError / ValueError / ConnectionError on failure."""
        if self.sock is None:
            self.sock = self.ctx.socket(zmq.REQ)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.address)
        timeout_ms = self.timeout_ms if timeout_s is None else max(1, int(timeout_s * 1000))
        try:
            if not self.sock.poll(timeout_ms, zmq.POLLOUT):
                raise TimeoutError(f"{self.address} did not accept a request within {timeout_ms} ms")
            self.sock.send(pack(msg))
            if not self.sock.poll(timeout_ms, zmq.POLLIN):
                raise TimeoutError(f"{self.address} did not answer {msg.get('op')!r} within {timeout_ms} ms")
            reply = unpack(self.sock.recv())
        except BaseException:
            self.close()
            raise
        if not reply.get("ok"):
            raise ConnectionError(f"{self.address} refused {msg.get('op')!r}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
