"""LMCacheManager: the lifecycle owner of lmcache's parts in one process (LMCache's
``lmcache/v1/manager.py`` and its internal API server, ``lmcache/v1/internal_api_server``).

One manager per role and process (``scheduler``, or ``worker`` with its rank): it holds the
engine, the lookup server and the lookup client that the vLLM connector built, reports their
health, and shuts them down in order (API server, lookup client, lookup server, then the
component graph, which flushes the tiers' pending writes). With ``internal_api_server_enabled``
it serves, like LMCache, on ``internal_api_server_host`` at port
``internal_api_server_port_start`` + 0 for the scheduler and + 1 + rank for a worker
(``internal_api_server_include_index_list``, when set, lists the offsets that serve):

- ``GET /health``: 200 when healthy, 503 otherwise; JSON ``{"healthy", "role", "worker_id",
  "tiers": [{"name", "class", "state", "chunks", "error"}], "lookup_server", "lookup_client"}``.
  A tier is probed with a ``contains`` of a key nobody stores (a remote tier makes one round
  trip); a tier that raises is ``"error"`` (the manager stays up: a failing tier costs hits).
- ``GET /conf``: the effective lmcache configuration (resolved, JSON).
- ``GET /metrics``: the engine's Prometheus metrics (``lmcache_*``, text format).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

logger = logging.getLogger(__name__)
_PROBE_HASH = 0x1C0FFEE  # a chunk hash no prefix chain produces in practice


class LMCacheManager:
    """Starts, health-checks and shuts down one process's lmcache parts.

    Args:
        role: ``"scheduler"`` or ``"worker"``.
        config: the composed lmcache config (DictConfig or mapping), for ``/conf`` and the
            ``internal_api_server_*`` keys (absent keys take LMCache's defaults: disabled,
            127.0.0.1, 6999).
        worker_id: the worker's rank (port offset 1 + worker_id).
        engine: the LMCacheEngine (worker), or None.
        lookup_server / lookup_client: objects with ``close()``, or None.
        shutdown_graph: closes the component graph (e.g. ``lambda:
            lmcache.containers.shutdown(container)``), called last by :meth:`close`.

    Raises:
        ValueError: an unknown role, or a bad ``internal_api_server_*`` value (naming it).
    """

    def __init__(self, role: str, config: Any = None, worker_id: int = 0, engine: Any = None,
                 lookup_server: Any = None, lookup_client: Any = None,
                 shutdown_graph: Callable[[], None] | None = None) -> None:
        if role not in ("scheduler", "worker"):
            raise ValueError(f"role={role!r}: expected 'scheduler' or 'worker'")
        self.role, self.worker_id = role, int(worker_id)
        self.config = config
        self.engine, self.lookup_server, self.lookup_client = engine, lookup_server, lookup_client
        self._shutdown_graph = shutdown_graph
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.enabled = bool(self._key("internal_api_server_enabled", False))
        self.host = str(self._key("internal_api_server_host", "127.0.0.1"))
        start = self._key("internal_api_server_port_start", 6999)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= 65535:
            raise ValueError(f"internal_api_server_port_start={start!r}: expected a port number")
        self.port_offset = 0 if role == "scheduler" else 1 + self.worker_id
        self.port = start + self.port_offset if start else 0
        allowed = self._key("internal_api_server_include_index_list", None)
        if allowed is not None and self.port_offset not in [int(i) for i in allowed]:
            self.enabled = False

    def _key(self, name: str, default: Any) -> Any:
        if self.config is None:
            return default
        value = self.config.get(name, default)
        return default if value is None and default is not None else value

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> "LMCacheManager":
        """Start the internal API server when enabled (a busy port is logged, not raised:
        serving goes on without it). Returns self."""
        if not self.enabled or self._http is not None:
            return self
        try:
            self._http = ThreadingHTTPServer((self.host, self.port), _handler(self))
        except OSError as exc:
            logger.warning("lmcache internal API server not started on %s:%d: %s",
                           self.host, self.port, exc)
            return self
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True,
                                        name=f"lmcache-api-{self.role}-{self.worker_id}")
        self._thread.start()
        logger.info("lmcache internal API server (%s %d) at http://%s:%d", self.role,
                    self.worker_id, self.host, self.port)
        return self

    @property
    def url(self) -> str | None:
        """``http://host:port`` of the running API server, else None."""
        return None if self._http is None else f"http://{self.host}:{self.port}"

    def close(self) -> None:
        """Stop the API server, then close the lookup client, lookup server and component
        graph (each once; an error in one is logged and the others still close)."""
        if self._closed:
            return
        self._closed = True
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        steps = (("lookup_client", lambda: self.lookup_client and self.lookup_client.close()),
                 ("lookup_server", lambda: self.lookup_server and self.lookup_server.close()),
                 ("component graph", lambda: self._shutdown_graph and self._shutdown_graph()))
        for name, step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - the rest must still close
                logger.exception("lmcache manager: closing the %s failed", name)
        self.lookup_client = self.lookup_server = self.engine = None

    # ---- health ----------------------------------------------------------------------
    def tier_states(self) -> list[dict[str, Any]]:
        """One dict per tier of the engine (empty without an engine): ``name``, ``class``,
        ``state`` ("ok" or "error"), ``chunks`` (stored, when the tier counts them) and
        ``error`` (the probe's exception, or None); ``stats``: the tier's counters, when it has a
        ``stats`` dict (disk, remote, PD)."""
        manager = getattr(self.engine, "storage_manager", None)
        if manager is None:
            return []
        probe = _probe_key(self.engine)
        out = []
        for tier in getattr(manager, "backends", []):
            state, error = "ok", None
            try:
                tier.contains(probe)
            except Exception as exc:  # noqa: BLE001 - a failing tier is reported, not raised
                state, error = "error", f"{type(exc).__name__}: {exc}"
            chunks = len(tier) if hasattr(tier, "__len__") else None
            entry = {"name": getattr(tier, "name", type(tier).__name__),
                     "class": type(tier).__name__, "state": state, "chunks": chunks,
                     "error": error}
            stats = getattr(tier, "stats", None)
            if isinstance(stats, dict):  # the tier's own counters (disk, remote, PD)
                entry["stats"] = dict(stats)
            out.append(entry)
        return out

    def health(self) -> dict[str, Any]:
        """The ``/health`` document (module docstring)."""
        tiers = self.tier_states()
        healthy = not self._closed and all(t["state"] == "ok" for t in tiers)
        return {"healthy": healthy, "role": self.role, "worker_id": self.worker_id,
                "tiers": tiers,
                "lookup_server": getattr(self.lookup_server, "address", None) and "running",
                "lookup_client": "running" if self.lookup_client is not None else None}

    def is_healthy(self) -> bool:
        return bool(self.health()["healthy"])

    def effective_config(self) -> dict[str, Any]:
        """The lmcache configuration as the process uses it (resolved; ``{}`` when unknown)."""
        if self.config is None:
            return {}
        from omegaconf import DictConfig, OmegaConf

        if isinstance(self.config, DictConfig):
            return OmegaConf.to_container(self.config, resolve=True)
        return dict(self.config)

    def metrics_text(self) -> bytes:
        """The engine's Prometheus metrics (text format; empty without an engine)."""
        from prometheus_client import generate_latest

        stats = getattr(self.engine, "stats", None)
        return generate_latest(stats.registry) if stats is not None else b""


def _probe_key(engine):
    """A key of this engine's model and rank whose chunk hash no document produces."""
    import dataclasses

    tokens = list(range(3, 3 + int(engine.token_database.chunk_size)))
    key = next(iter(engine.token_database.process_tokens(tokens)))[2]
    return dataclasses.replace(key, chunk_hash=_PROBE_HASH)


def _handler(manager: LMCacheManager):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/health":
                doc = manager.health()
                self._send(200 if doc["healthy"] else 503, json.dumps(doc).encode(), "application/json")
            elif path == "/conf":
                self._send(200, json.dumps(manager.effective_config(), default=str).encode(),
                           "application/json")
            elif path == "/metrics":
                self._send(200, manager.metrics_text(), "text/plain; version=0.0.4")
            else:
                self._send(404, b'{"error": "unknown path; try /health, /conf, /metrics"}',
                           "application/json")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:  # quiet: no access log on stderr
            logger.debug("lmcache API %s", fmt % args)

    return Handler
