"""lmcache-server refuses flags it could not honour with a one-line error, before it listens:
nan/inf sizes, timeouts that sockets refuse (OverflowError in every connection thread before),
and an address it cannot listen on (a traceback before)."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from lmcache.server.__main__ import main as server_main
from lmcache.server.cache_server import LMCacheServer


@pytest.mark.parametrize(("flags", "message"), [
    (("--max-size-gb", "nan"), "argument --max-size-gb: expected a finite number, got 'nan'"),
    (("--max-value-mb", "inf"), "argument --max-value-mb: expected a finite number, got 'inf'"),
    (("--max-inflight-mb", "x"), "argument --max-inflight-mb: invalid number: 'x'"),
    (("--idle-timeout-s", "inf"), "argument --idle-timeout-s: expected a finite number, got 'inf'"),
    (("--read-timeout-s", "1e20"),
     "--max-connections must be >= 1, --idle-timeout-s in 0..86400, --read-timeout-s in "
     "(0, 86400]"),
    (("--idle-timeout-s", "86401"),
     "--max-connections must be >= 1, --idle-timeout-s in 0..86400, --read-timeout-s in "
     "(0, 86400]"),
])
def test_flags_the_server_could_not_honour_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exited:
        server_main(["127.0.0.1", "0", *flags])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.splitlines()[-1] == f"lmcache-server: error: {message}"


def test_an_address_in_use_is_a_one_line_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            server_main(["127.0.0.1", str(port)])
    err = capsys.readouterr().err
    assert exited.value.code == 1
    assert err == (f"lmcache-server: error: cannot listen on 127.0.0.1:{port}: "
                   "Address already in use\n")


@pytest.mark.parametrize("kwargs", [dict(read_timeout_s=1e20), dict(idle_timeout_s=float("inf")),
                                    dict(read_timeout_s=float("nan"))])
def test_the_server_class_refuses_timeouts_sockets_cannot_take(kwargs):
    with pytest.raises(ValueError, match=r"read_timeout_s in \(0, 86400\] \(sockets refuse"):
        LMCacheServer(port=0, **kwargs)


def test_the_longest_timeouts_still_serve():
    server = LMCacheServer(port=0, idle_timeout_s=86400, read_timeout_s=86400)
    server.start()
    try:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as c:
            c.sendall(struct.pack("<9i150s", 5, 0, 0, 0, 0, 0, 0, 0, 0, b"k".ljust(150)))
            reply = c.recv(36)
        assert struct.unpack("<9i", reply)[0] == 200
    finally:
        server.stop()
