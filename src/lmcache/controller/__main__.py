"""``python -m lmcache.controller [key=value ...]`` / ``lmcache-controller``: the CacheController
process (Hydra app, config ``conf/cache_controller/serve.yaml``): the ZMQ ports for the workers
and the HTTP API (uvicorn) until interrupted.

Examples::

    python -m lmcache.controller controller_port=9000 controller_monitor_ports.pull=8300 \\
        controller_monitor_ports.reply=8400
    python -m lmcache.controller controller_index=valkey controller_index.url=valkey://127.0.0.1:6379
"""

from __future__ import annotations

import difflib
import logging
import socket
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from lmcache.config.compose import register_resolvers

log = logging.getLogger("lmcache.controller")


KEYS = ("token_database", "controller_index", "controller_host", "controller_port",
        "controller_monitor_ports", "lmcache_worker_timeout", "command_timeout_secs",
        "chunk_size", "save_unfull_chunk", "hash_algorithm", "hash_seed")
"""The top-level keys of ``conf/cache_controller/serve.yaml``; any other (``+foo=1``) is refused."""


def check_serve_config(plain: dict) -> None:
    """Refuse what the controller would otherwise accept silently or fail on late.

    Raises:
        ValueError: a top-level key the controller does not read (with a "did you mean"),
            ``controller_port`` that is not a port (1..65535), or a ``controller_host`` that
            does not resolve; each message names the key and the value."""
    for key in plain:
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"unknown key {key!r}: the controller reads "
                             f"{', '.join(KEYS)}{hint}")
    port = plain["controller_port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"controller_port must be a port (1..65535), got {port!r}")
    host = plain["controller_host"]
    try:
        socket.getaddrinfo(str(host), None)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"controller_host must be an address of this machine, got {host!r} "
                         f"({e})") from None


def serve(cfg: DictConfig) -> int:
    """Build the controller from ``cfg`` and serve until interrupted; returns an exit status.

    Raises:
        ValueError: a bad key or value (see :func:`check_serve_config`, and the components').
        OSError, zmq.ZMQError: a port that cannot be bound."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_serve_config(plain)  # (before the heavy imports: a typo fails fast)
    import uvicorn

    from lmcache.containers import build
    from lmcache.controller.cache_controller import CacheController
    from lmcache.controller.http_api import create_app
    ports = plain["controller_monitor_ports"]
    index = build(plain["controller_index"])
    try:
        controller = CacheController(
            index=index, token_database=build(plain["token_database"], metadata=None),
            controller_host=plain["controller_host"], controller_monitor_ports=ports,
            lmcache_worker_timeout=plain["lmcache_worker_timeout"],
            command_timeout_secs=plain["command_timeout_secs"])
    except BaseException:
        index.close()
        raise
    try:
        from lmcache.token_database.cbor_chain import enable_compiled_encoder

        enable_compiled_encoder()  # this process runs no vLLM engine: long lookups use numba
        log.info("lmcache controller: HTTP on %s:%d, pull %d, reply %d, index %s",
                 plain["controller_host"], plain["controller_port"], controller.pull_port,
                 controller.reply_port, type(index).__name__)
        uvicorn.run(create_app(controller), host=plain["controller_host"],
                    port=int(plain["controller_port"]), log_level="warning")
    finally:
        controller.close()
    return 0


@hydra.main(version_base="1.3", config_path="pkg://lmcache.conf",
            config_name="cache_controller/serve")
def hydra_app(cfg: DictConfig) -> None:
    import zmq

    try:
        status = serve(cfg)
    except (ValueError, OSError, zmq.ZMQError) as e:
        print(f"lmcache-controller: {e}", file=sys.stderr)
        status = 2
    if status:
        sys.exit(status)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    register_resolvers()
    hydra_app()


if __name__ == "__main__":
    main()
