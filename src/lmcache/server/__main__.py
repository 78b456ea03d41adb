"""Command line of the lm:// cache server: ``python -m lmcache.server [HOST] [PORT] [options]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Optional, Sequence

from lmcache.server.cache_server import LMCacheServer


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), serve until interrupted; returns 0.

    Positional HOST (default 127.0.0.1) and PORT (default 65432) follow LMCache's
    ``lmcache.server HOST PORT`` form; ``--max-size-gb`` bounds the stored bytes (LRU
    eviction) and ``--max-value-mb`` the size of one value.
    """
    parser = argparse.ArgumentParser(prog="lmcache-server", description=__doc__)
    parser.add_argument("host", nargs="?", default="127.0.0.1")
    parser.add_argument("port", nargs="?", type=int, default=65432)
    parser.add_argument("--max-size-gb", type=float, default=4.0,
                        help="total GiB of values kept in memory (LRU eviction), default 4")
    parser.add_argument("--max-value-mb", type=float, default=1024.0,
                        help="largest single value in MiB, default 1024")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"port must be in 0..65535, got {args.port}")
    if args.max_size_gb <= 0 or args.max_value_mb <= 0:
        parser.error("--max-size-gb and --max-value-mb must be > 0")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = LMCacheServer(
        host=args.host,
        port=args.port,
        max_size_bytes=int(args.max_size_gb * (1 << 30)),
        max_value_bytes=int(args.max_value_mb * (1 << 20)),
    )
    try:
        asyncio.run(server.serve_forever())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
