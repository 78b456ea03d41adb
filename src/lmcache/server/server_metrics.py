"""ServerMetrics: the lm server's Prometheus metrics, in a registry of its own.

Serve them with :meth:`ServerMetrics.serve` (``lmcache-server --metrics-port PORT``); names carry
the ``lmcache_server_`` prefix, counters Prometheus' ``_total`` suffix.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class ServerMetrics:
    """Counters and gauges of one LMCacheServer.

    Args:
        connections: returns the number of open client connections.
        stored_bytes, stored_keys, inflight_bytes: return the store's current values.

    Attributes:
        registry: the CollectorRegistry holding every metric below.
        requests: ``lmcache_server_requests_total{command}``.
        get_hits / get_misses: GETs answered with / without a value.
        refused_connections: connections closed at once because the limit was reached.
        dropped_connections: ``{reason}`` = idle | timeout | protocol | unauthorized.
        refused_puts: ``{reason}`` = too_large | busy (nothing stored).
        evictions: entries evicted to make room.
    """

    def __init__(self, connections: Callable[[], int], stored_bytes: Callable[[], int],
                 stored_keys: Callable[[], int], inflight_bytes: Callable[[], int],
                 evictions: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        p = "lmcache_server_"
        r = self.registry
        self.requests = Counter(p + "requests", "Requests served, by command.", ["command"],
                                registry=r)
        self.get_hits = Counter(p + "get_hits", "GET requests answered with a value.",
                                registry=r)
        self.get_misses = Counter(p + "get_misses", "GET requests for an absent key.",
                                  registry=r)
        self.refused_connections = Counter(
            p + "refused_connections", "Connections closed on accept: connection limit reached.",
            registry=r)
        self.dropped_connections = Counter(
            p + "dropped_connections", "Connections the server closed, by reason.", ["reason"],
            registry=r)
        self.refused_puts = Counter(p + "refused_puts", "PUTs not stored, by reason.",
                                    ["reason"], registry=r)
        for name, doc, fn in (
            ("connections", "Open client connections.", connections),
            ("stored_bytes", "Bytes of stored values.", stored_bytes),
            ("stored_keys", "Number of stored values.", stored_keys),
            ("inflight_bytes", "Bytes of PUT values being received now.", inflight_bytes),
            ("evictions", "Entries evicted to make room (since start).", evictions),
        ):
            Gauge(p + name, doc, registry=r).set_function(fn)

    def serve(self, port: int, host: str) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 picks a port); returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
