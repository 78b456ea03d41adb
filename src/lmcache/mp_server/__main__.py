"""``python -m lmcache.mp_server [--host H] [--port P] [...] [hydra overrides...]``

Starts lmcache's MP server (:class:`lmcache.mp_server.server.MPServer`) with lmcache's Hydra
config tree: tiers, policy, serde, chunk size... are the usual overrides, e.g.
``storage/backends=[local_cpu,local_disk] local_disk=/nvme/kv max_local_disk_size=100``; an
LMCache YAML (``LMCACHE_CONFIG_FILE``) and ``LMCACHE_*`` variables translate as for the
connector. vLLM then uses it with ``--kv-transfer-config '{"kv_connector":"LMCacheMPConnector",
"kv_role":"kv_both","kv_connector_extra_config":{"lmcache.mp.host":"tcp://localhost",
"lmcache.mp.port":5555}}'``. Exit status 2 on a bad flag or config; SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from functools import partial


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmcache-mp-server", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="localhost",
                   help="interface to listen on (default localhost; * for all)")
    p.add_argument("--port", type=int, default=5555, help="TCP port (default 5555, LMCache's)")
    p.add_argument("--url", default=None, help="full ZMQ address to bind instead (e.g. ipc:///tmp/lmc)")
    p.add_argument("--session-timeout", type=float, default=30.0,
                   help="seconds without heartbeat before an engine's session is freed")
    p.add_argument("--event-timeout", type=float, default=60.0,
                   help="seconds a transfer waits for the engine's CUDA event")
    p.add_argument("--no-check-pids", action="store_true",
                   help="do not treat an engine whose pid is gone as dead (other pid namespace)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("overrides", nargs="*", help="lmcache Hydra overrides (key=value)")
    return p.parse_args(argv)


def bind_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    host = "127.0.0.1" if args.host == "localhost" else args.host
    return f"tcp://{host}:{args.port}"


def check_mp_config(cfg) -> None:
    """ValueError for options the MP server does not run: blend options other than
    ``cacheblend`` (served by the BlendServer: segment store, CB lookup and re-RoPE retrieve;
    the token selection stays in the engine) and gpu connectors other than the paged ones."""
    from lmcache.config.checks import option_name

    blend = option_name(cfg.blend) if cfg.get("blend") is not None else None
    if blend is not None and blend != "cacheblend":
        raise ValueError(f"blend={blend}: the MP server's CacheBlend variant (BlendServer) "
                         "runs blend=cacheblend only; use blend=none or blend=cacheblend")
    conn = option_name(cfg.get("gpu_connector"))
    allowed = ("vllm_paged", "vllm_layerwise") + (("vllm_buffer_layerwise",) if blend else ())
    if conn not in allowed:
        raise ValueError(f"gpu_connector={conn}: the MP server moves KV with vllm_paged or "
                         "vllm_layerwise")


def build_server(args: argparse.Namespace):
    """Compose the config and build the MPServer (nothing is served yet).

    Raises:
        ValueError: a bad override, LMCache key, value or flag (names it).
        zmq.ZMQError: the address cannot be listened on.
    """
    from lmcache import containers
    from lmcache.config.compose import compose_config
    from lmcache.config.legacy import legacy_overrides
    from lmcache.mp_server.engine_pool import EnginePool
    from lmcache.mp_server.server import MPServer
    from lmcache.mp_server.session_manager import SessionManager

    pairs = legacy_overrides(os.environ.get("LMCACHE_CONFIG_FILE"), os.environ, {})
    overrides = [o for o, _ in pairs] + list(args.overrides)
    sources = [s for _, s in pairs] + ["lmcache-mp-server command line"] * len(args.overrides)
    cfg = compose_config(overrides, sources=sources)
    from lmcache.config.checks import check_values

    check_values(cfg)  # types and ranges of the top-level keys (max_local_cpu_size=-1, ...)
    check_mp_config(cfg)
    chunk_size = int(cfg.token_database.get("chunk_size", cfg.chunk_size))
    pool = EnginePool(partial(containers.build_mp_engine, cfg), chunk_size)
    sessions = SessionManager(args.session_timeout, check_pids=not args.no_check_pids)
    blend = None
    if cfg.get("blend") is not None:
        from lmcache.mp_server.blend_server import BlendServer

        db = cfg.token_database
        seps = db.get("separator_tokens")
        blend = BlendServer(db.get("blend_special_str", " # # "),
                            None if seps is None else [int(t) for t in seps],
                            db.get("hash_algorithm", "sha256_cbor"), db.get("hash_seed"),
                            capacity_bytes=max(1, int(float(cfg.get("max_local_cpu_size", 5.0))
                                                      * (1 << 30))))
    return MPServer(pool, sessions, bind_url(args), event_timeout=args.event_timeout,
                    blend=blend)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import zmq

    try:
        server = build_server(args)
    except (ValueError, TypeError) as e:
        print(f"lmcache-mp-server: {e}", file=sys.stderr)
        return 2
    except zmq.ZMQError as e:  # an address that cannot be listened on (--host, --port, --url)
        print(f"lmcache-mp-server: cannot listen: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
