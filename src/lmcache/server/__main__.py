"""Command line of the lm:// cache server: ``python -m lmcache.server [HOST] [PORT] [options]``."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from lmcache.server.cache_server import MAX_TIMEOUT_S, LMCacheServer
from lmcache.server.protocol import MAX_VALUE_BYTES, check_token

TOKEN_ENV = "LMCACHE_SERVER_TOKEN"


def _read_token(path: Optional[str], parser: argparse.ArgumentParser) -> Optional[str]:
    if path is None:
        token = os.environ.get(TOKEN_ENV) or None
        source = f"${TOKEN_ENV}"
    else:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            parser.error(f"--token-file {path!r}: {e}")
        source = f"--token-file {path!r}"
    try:
        return check_token(token)
    except ValueError as e:
        parser.error(f"{source}: {e}")
    return None


def _finite(text: str) -> float:
    """argparse type: a finite number (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), serve until SIGINT/SIGTERM; returns 0.

    Positional HOST (default 127.0.0.1), PORT (default 65432) and STORAGE (only ``cpu``) follow
    LMCache's ``lmcache.v1.server HOST PORT [cpu]`` form. Exit status 2 on a bad flag, 1 when
    the address cannot be listened on (in use, unknown host), with the reason on stderr.
    """
    parser = argparse.ArgumentParser(
        prog="lmcache-server",
        description="lmcache's lm:// cache server (speaks LMCache 0.5.6's server protocol).")
    parser.add_argument("host", nargs="?", default="127.0.0.1")
    parser.add_argument("port", nargs="?", type=int, default=65432)
    parser.add_argument("storage", nargs="?", default="cpu", choices=["cpu"],
                        help="LMCache's third argument (where values live); only cpu")
    parser.add_argument("--max-size-gb", type=_finite, default=4.0,
                        help="total GiB of values kept in memory (LRU eviction), default 4")
    parser.add_argument("--max-value-mb", type=_finite, default=256.0,
                        help="largest single value in MiB, default 256")
    parser.add_argument("--max-inflight-mb", type=_finite, default=512.0,
                        help="MiB of PUT values being received at once (others wait, then are "
                             "refused as busy), default 512")
    parser.add_argument("--max-connections", type=int, default=256,
                        help="open client connections (at the limit the longest-idle one is "
                             "closed, else the new one is refused), default 256")
    parser.add_argument("--idle-timeout-s", type=_finite, default=600.0,
                        help="close a connection idle this long; 0 = never, default 600")
    parser.add_argument("--read-timeout-s", type=_finite, default=10.0,
                        help="longest wait for the next bytes of a message, default 10")
    parser.add_argument("--token-file", default=None,
                        help=f"file holding the shared token clients must send (default: "
                             f"${TOKEN_ENV}, else no token)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus /metrics on this port (same host); off by default")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    for name in ("port", "metrics_port"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 65535:
            parser.error(f"{name.replace('_', '-')} must be in 0..65535, got {value}")
    if args.max_size_gb <= 0 or args.max_inflight_mb <= 0 or args.max_value_mb <= 0:
        parser.error("--max-size-gb, --max-value-mb and --max-inflight-mb must be > 0")
    if args.max_value_mb > args.max_inflight_mb or args.max_value_mb * (1 << 20) > MAX_VALUE_BYTES:
        parser.error(f"--max-value-mb {args.max_value_mb} must be <= --max-inflight-mb "
                     f"{args.max_inflight_mb} and < 2048")
    if (args.max_connections < 1 or not 0 <= args.idle_timeout_s <= MAX_TIMEOUT_S
            or not 0 < args.read_timeout_s <= MAX_TIMEOUT_S):
        parser.error(f"--max-connections must be >= 1, --idle-timeout-s in 0..{MAX_TIMEOUT_S}, "
                     f"--read-timeout-s in (0, {MAX_TIMEOUT_S}]")
    token = _read_token(args.token_file, parser)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = LMCacheServer(
        host=args.host, port=args.port,
        max_size_bytes=int(args.max_size_gb * (1 << 30)),
        max_value_bytes=int(args.max_value_mb * (1 << 20)),
        max_inflight_bytes=int(args.max_inflight_mb * (1 << 20)),
        max_connections=args.max_connections, idle_timeout_s=args.idle_timeout_s,
        read_timeout_s=args.read_timeout_s, token=token,
    )
    try:
        server.start()
    except OSError as e:
        parser.exit(1, f"lmcache-server: error: {e.strerror or e}\n")
    if args.metrics_port is not None:
        port = server.metrics.serve(args.metrics_port, args.host)
        logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", args.host, port)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
