"""CircuitBreaker: a tier that timed out fails fast until a background probe finds it back."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)


class CircuitBreaker:
    """Closed → open on :meth:`trip` (a call that missed its deadline); while open every
    :meth:`reject` answers True at once (the caller fails fast: a miss, a dropped put) and a
    daemon thread calls ``probe`` every ``probe_interval_secs`` seconds; the first probe that
    returns True closes the breaker again. A probe that raises counts as a failed probe.

    Args:
        name: for logs (e.g. ``"RemoteBackend valkey://host:port"``).
        probe: returns True when the remote answered in time; may block (it runs on the
            probe thread only, one probe at a time).
        probe_interval_secs: seconds between probes while open, > 0.

    Attributes:
        stats: ``opens`` (trips while closed), ``closes`` (probes that closed it),
            ``rejected`` (calls failed fast while open), ``probes`` (probes run).

    Raises:
        ValueError: probe_interval_secs <= 0.
    """

    def __init__(self, name: str, probe: Callable[[], bool], probe_interval_secs: float = 1.0
                 ) -> None:
        if isinstance(probe_interval_secs, bool) or not probe_interval_secs > 0:
            raise ValueError(f"probe_interval_secs must be > 0, got {probe_interval_secs!r}")
        self.name = name
        self._probe = probe
        self.probe_interval_secs = float(probe_interval_secs)
        self._lock = threading.Lock()
        self._open = False
        self._shutdown = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = dict.fromkeys(("opens", "closes", "rejected", "probes"), 0)

    @property
    def is_open(self) -> bool:
        """True while calls fail fast."""
        return self._open

    def reject(self) -> bool:
        """True (and counted in ``rejected``) when the caller must fail fast now."""
        if self._open:
            self.stats["rejected"] += 1
            return True
        return False

    def trip(self, reason: str) -> None:
        """Open the breaker (no-op when already open or shut down) and start probing."""
        with self._lock:
            if self._open or self._shutdown.is_set():
                return
            self._open = True
            self.stats["opens"] += 1
            alive = self._thread is not None and self._thread.is_alive()
            if not alive:
                self._thread = threading.Thread(target=self._probe_loop, daemon=True,
                                                name="lmc-breaker-probe")
                self._thread.start()
        logger.warning("%s: %s; failing fast (hits and uploads skip this tier) until a probe "
                       "every %.1fs answers", self.name, reason, self.probe_interval_secs)

    def _probe_loop(self) -> None:
        while not self._shutdown.wait(self.probe_interval_secs):
            if not self._open:
                return
            self.stats["probes"] += 1
            started = time.monotonic()
            try:
                ok = bool(self._probe())
            except Exception as e:  # noqa: BLE001 - a failed probe keeps the breaker open
                logger.debug("%s probe failed: %r", self.name, e)
                ok = False
            if ok and not self._shutdown.is_set():
                with self._lock:
                    self._open = False
                    self.stats["closes"] += 1
                    self._thread = None
                logger.warning("%s answers again (probe took %.3fs); breaker closed",
                               self.name, time.monotonic() - started)
                return

    def shutdown(self) -> None:
        """Stop probing (idempotent; a probe in progress finishes in the background)."""
        self._shutdown.set()
