"""BlackholeConnector: the ``blackhole://`` remote; drops every write and always misses."""

from __future__ import annotations

from typing import Optional

from lmcache.storage.connectors.base import Buffer, RemoteConnector


class BlackholeConnector(RemoteConnector):
    """A remote that stores nothing: ``put`` succeeds and discards, ``get`` and ``exists``
    always miss. Useful to measure the cost of the remote path (serialization, checksums,
    threads) without a server.

    Args:
        url: ``blackhole://`` (anything after the scheme is ignored).
        blocking_timeout_secs, retry_interval_secs: accepted for a uniform config; unused.

    Raises:
        ValueError: a url that is not ``blackhole://...``.
    """

    name = "blackhole"

    def __init__(
        self,
        url: str = "blackhole://",
        blocking_timeout_secs: float = 10.0,
        retry_interval_secs: float = 1.0,
    ) -> None:
        super().__init__(url, blocking_timeout_secs, retry_interval_secs)
        if not url.startswith("blackhole://"):
            raise ValueError(f"blackhole connector url must be blackhole://, got {url!r}")
        self.stats["dropped_puts"] = 0

    def _exists(self, key: str) -> bool:
        return False

    def _get(self, key: str) -> Optional[tuple[bytes, Buffer]]:
        return None

    def _put(self, key: str, metadata: bytes, payload: Buffer) -> None:
        self.stats["dropped_puts"] += 1

    def _remove(self, key: str) -> bool:
        return False
