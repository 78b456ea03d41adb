"""ConnectionTable: the lm server's open connections, their idle state, and the limit."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)


class ConnectionTable:
    """Open connections, each idle (waiting for a request, since when) or busy.

    At the limit, admitting a connection closes the one idle the longest (its serving thread
    then reads EOF); with none idle, the new connection is refused (closed at once).

    Args:
        max_connections: open connections at most; >= 1.
        on_refused: called once per refused connection.
        on_evicted: called once per connection closed to make room.
    """

    def __init__(self, max_connections: int, on_refused: Callable[[], None],
                 on_evicted: Callable[[], None]) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.max_connections = int(max_connections)
        self._on_refused, self._on_evicted = on_refused, on_evicted
        self._conns: dict[socket.socket, Optional[float]] = {}  # -> idle since; None = busy
        self._lock = threading.Lock()
        self._last_refusal_log = 0.0

    def __len__(self) -> int:
        return len(self._conns)

    def admit(self, conn: socket.socket) -> bool:
        """Add ``conn`` (idle); False when it was refused and closed."""
        with self._lock:
            if len(self._conns) >= self.max_connections:
                idle = [(since, c) for c, since in self._conns.items() if since is not None]
                if not idle:
                    conn.close()
                    self._on_refused()
                    now = time.monotonic()
                    if now - self._last_refusal_log > 10:
                        self._last_refusal_log = now
                        logger.warning("connection limit %d reached and no connection idle; "
                                       "refusing new connections", self.max_connections)
                    return False
                victim = min(idle, key=lambda t: t[0])[1]
                self._conns.pop(victim)
                shutdown(victim)
                self._on_evicted()
            self._conns[conn] = time.monotonic()
            return True

    def set_idle(self, conn: socket.socket, idle: bool) -> bool:
        """Mark ``conn`` idle or busy; False when it was evicted (or removed) meanwhile."""
        with self._lock:
            if conn not in self._conns:
                return False
            self._conns[conn] = time.monotonic() if idle else None
            return True

    def remove(self, conn: socket.socket) -> None:
        """Forget ``conn`` (its owner closes it)."""
        with self._lock:
            self._conns.pop(conn, None)

    def shutdown_all(self) -> None:
        """Shut every connection down (their threads then read EOF)."""
        with self._lock:
            for conn in list(self._conns):
                shutdown(conn)


def shutdown(sock: socket.socket) -> None:
    """``sock.shutdown(SHUT_RDWR)``, ignoring a socket that is already gone."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
