"""ValkeyConnector: the ``valkey://`` / ``redis://`` (``valkeys://`` / ``rediss://`` TLS) remote
on one Valkey or Redis server, through valkey-py."""

from __future__ import annotations

from typing import Any, Optional

import valkey
import valkey.exceptions as vexc
from valkey.connection import ConnectionPool, SSLConnection, parse_url

from lmcache.storage.connectors.base import Buffer, RemoteConnector
from lmcache.storage.connectors.wire_format import DEFAULT_MAX_PAYLOAD_BYTES

PAYLOAD_SUFFIX = "kv_bytes"
METADATA_SUFFIX = "metadata"
SCHEMES = ("valkey", "redis", "valkeys", "rediss")
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    vexc.ConnectionError,
    vexc.TimeoutError,
    OSError,
)


def client_options(
    blocking_timeout_secs: float,
    username: Optional[str],
    password: Optional[str],
    tls: bool,
    tls_ca_certs: Optional[str],
    tls_certfile: Optional[str],
    tls_keyfile: Optional[str],
    tls_check_hostname: bool,
) -> dict[str, Any]:
    """valkey-py keyword arguments shared by the standalone and cluster connectors: socket
    timeouts of ``blocking_timeout_secs`` seconds, no client-side retries (the connector's
    circuit breaker decides when to try again), credentials and TLS files when given."""
    opts: dict[str, Any] = {
        "socket_timeout": blocking_timeout_secs,
        "socket_connect_timeout": blocking_timeout_secs,
        "health_check_interval": 0,
    }
    if username is not None:
        opts["username"] = username
    if password is not None:
        opts["password"] = password
    if tls:
        opts["ssl_check_hostname"] = tls_check_hostname
        opts["ssl_cert_reqs"] = "required" if tls_ca_certs or tls_check_hostname else "none"
        for name, value in (("ssl_ca_certs", tls_ca_certs), ("ssl_certfile", tls_certfile),
                            ("ssl_keyfile", tls_keyfile)):
            if value is not None:
                opts[name] = value
    return opts


class ValkeyConnector(RemoteConnector):
    """One Valkey/Redis server, LMCache's key layout: ``<key>kv_bytes`` holds the payload and is
    written first, ``<key>metadata`` holds the 36-byte metadata (DESIGN.md §4.5).

    A get reads both keys in one pipelined round trip (metadata first); a put writes the payload
    then the metadata in one pipelined round trip. Every socket operation times out after
    ``blocking_timeout_secs``; a dead connection is replaced on the next call.

    Args:
        url: ``valkey://[user[:password]@]host:port[/db]`` (also ``redis://``; ``valkeys://`` and
            ``rediss://`` use TLS), or ``unix:///path.sock``.
        blocking_timeout_secs, retry_interval_secs, max_payload_bytes: see RemoteConnector.
        username, password: ACL user and password (override the url's).
        db: database number (overrides the url's).
        tls: use TLS even with a plain ``valkey://`` url.
        tls_ca_certs, tls_certfile, tls_keyfile: PEM files (CA bundle, client cert and key).
        tls_check_hostname: verify the server's name against its certificate.

    Raises:
        ValueError: unknown url scheme or a malformed url.
    """

    name = "valkey"
    transport_errors = TRANSPORT_ERRORS

    def __init__(
        self,
        url: str,
        blocking_timeout_secs: float = 10.0,
        retry_interval_secs: float = 1.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        username: Optional[str] = None,
        password: Optional[str] = None,
        db: Optional[int] = None,
        tls: bool = False,
        tls_ca_certs: Optional[str] = None,
        tls_certfile: Optional[str] = None,
        tls_keyfile: Optional[str] = None,
        tls_check_hostname: bool = True,
    ) -> None:
        super().__init__(url, blocking_timeout_secs, retry_interval_secs, max_payload_bytes)
        scheme = url.split("://", 1)[0].lower()
        if scheme not in SCHEMES and scheme != "unix":
            raise ValueError(f"valkey connector url scheme must be one of {SCHEMES}, got {url!r}")
        kwargs = parse_url(url)
        tls = tls or scheme in ("valkeys", "rediss")
        kwargs.update(client_options(self.blocking_timeout_secs, username, password, tls,
                                     tls_ca_certs, tls_certfile, tls_keyfile,
                                     tls_check_hostname))
        if db is not None:
            kwargs["db"] = int(db)
        if tls:
            kwargs["connection_class"] = SSLConnection
        self._pool = ConnectionPool(**kwargs)
        self._client = valkey.Valkey(connection_pool=self._pool)

    def _exists(self, key: str) -> bool:
        return self._client.exists(key + METADATA_SUFFIX) == 1

    def _batched_exists(self, keys: list[str]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key + METADATA_SUFFIX)
        return [r == 1 for r in pipe.execute()]

    def _get(self, key: str) -> Optional[tuple[bytes, Buffer]]:
        pipe = self._client.pipeline(transaction=False)
        pipe.get(key + METADATA_SUFFIX)
        pipe.get(key + PAYLOAD_SUFFIX)
        metadata, payload = pipe.execute()
        if metadata is None or payload is None:
            return None
        return metadata, payload

    def _put(self, key: str, metadata: bytes, payload: Buffer) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.set(key + PAYLOAD_SUFFIX, memoryview(payload).cast("B"))
        pipe.set(key + METADATA_SUFFIX, metadata)
        pipe.execute()

    def _remove(self, key: str) -> bool:
        return self._client.delete(key + METADATA_SUFFIX, key + PAYLOAD_SUFFIX) > 0

    def _close(self) -> None:
        self._client.close()
        self._pool.disconnect()
