"""ValkeyConnector: the ``redis://`` / ``valkey://`` (``rediss://`` / ``valkeys://`` TLS) remote on
one Valkey or Redis server, through valkey-py, in LMCache 0.5.6's key layout for each scheme."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Optional

import valkey
import valkey.exceptions as vexc
from valkey.connection import ConnectionPool, SSLConnection, parse_url

from lmcache.keys import CacheEngineKey, LayerCacheEngineKey
from lmcache.serde.wire.chunk_layout import ChunkLayout
from lmcache.serde.wire.remote_metadata import DEFAULT_MAX_PAYLOAD_BYTES, RemoteMetadata
from lmcache.storage.connectors.base import Buffer, RemoteConnector

if TYPE_CHECKING:
    from lmcache.metadata import LMCacheMetadata

PAYLOAD_SUFFIX = "kv_bytes"
METADATA_SUFFIX = "metadata"
SIDE_SUFFIX = "lmc_meta"


def entry_writes(key: str, metadata: bytes, payload: memoryview,
                 one_key: bool) -> list[tuple[str, Any]]:
    """The (name, value) SETs of one entry, in write order: the part a reader checks last is
    written last. Two-key layout (``redis://``): ``<key>kv_bytes`` then ``<key>metadata``;
    one-key layout (``valkey://``, LMCache's GLIDE connector): the side key ``<key>lmc_meta``
    then the raw payload under ``<key>``."""
    if one_key:
        return [(key + SIDE_SUFFIX, metadata), (key, payload)]
    return [(key + PAYLOAD_SUFFIX, payload), (key + METADATA_SUFFIX, metadata)]
TWO_KEY_SCHEMES = ("redis", "rediss", "unix")
ONE_KEY_SCHEMES = ("valkey", "valkeys")
SCHEMES = ONE_KEY_SCHEMES + TWO_KEY_SCHEMES
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


def full_chunk_metadata(key: str, layout: Optional[ChunkLayout]) -> Optional[bytes]:
    """The 28-byte LMCache header of a full chunk of ``layout`` stored under ``key``: what
    LMCache's one-key (GLIDE) ``valkey://`` layout implies for a value it wrote (no metadata:
    LMCache reads it into a full chunk of its own shape). A layer key gives one layer's
    ``[T, 2, D]`` KV_T2D. None when the layout or its chunk size is unknown."""
    if layout is None or layout.chunk_size < 1:
        return None
    try:
        layerwise = isinstance(CacheEngineKey.from_string(key), LayerCacheEngineKey)
    except ValueError:
        return None
    shape, fmt = layout.full_chunk(layerwise)
    nbytes = 1
    for d in shape:
        nbytes *= d
    return RemoteMetadata(nbytes * layout.kv_dtype.itemsize, fmt, layout.kv_dtype,
                          shape).header_bytes()


def one_key_servable(key: str, size: int, side: int, layout: Optional[ChunkLayout]) -> bool:
    """Whether a one-key (``valkey://``) value of ``size`` bytes can be served: it has
    lmcache's side key, or it is exactly a full chunk of ``layout`` (LMCache's values)."""
    if size <= 0:
        return False
    if side:
        return True
    header = full_chunk_metadata(key, layout)
    return header is not None and struct.unpack_from("<i", header)[0] == size


class ValkeyConnector(RemoteConnector):
    """One Valkey/Redis server, in LMCache 0.5.6's layout of the url's scheme (DESIGN.md §4.5):

    * ``redis://``, ``rediss://``, ``unix://`` (LMCache's RedisConnector): ``<key>kv_bytes``
      holds the payload, ``<key>metadata`` the 56-byte metadata (LMCache reads its first 28
      bytes, the header, and ignores lmcache's trailer). Both are written in one MULTI/EXEC;
      a chunk exists only when both keys do (one ``EXISTS`` of the two), so a payload evicted
      by the server (``allkeys-lru``) is never counted.
    * ``valkey://``, ``valkeys://`` (LMCache's GLIDE ValkeyConnector): ``<key>`` holds the raw
      payload, nothing else (LMCache reads it into a full chunk and misses on any other size).
      lmcache's 56-byte metadata goes to the side key ``<key>lmc_meta``, which LMCache never
      reads. A value without a side key (written by LMCache) is read as a full chunk of this
      instance's layout (``metadata``), checked by size. Presence (one round trip with the
      payload's ``STRLEN``): the side key exists, or the value is exactly a full chunk.

    A get reads both keys in one pipelined round trip. Every socket operation times out after
    ``blocking_timeout_secs``; after a dropped connection the pool is reconnected and the call
    retried once (see RemoteConnector).

    Args:
        url: ``valkey://[user[:password]@]host:port[/db]`` (also ``redis://``; ``valkeys://`` and
            ``rediss://`` use TLS), or ``unix:///path.sock`` (two-key layout).
        blocking_timeout_secs, retry_interval_secs, max_payload_bytes: see RemoteConnector.
        username, password: ACL user and password (override the url's).
        db: database number (overrides the url's).
        tls: use TLS even with a plain ``valkey://`` url.
        tls_ca_certs, tls_certfile, tls_keyfile: PEM files (CA bundle, client cert and key).
        tls_check_hostname: verify the server's name against its certificate.
        metadata: this worker's LMCacheMetadata (injected): the full-chunk shape of values
            LMCache wrote under ``valkey://``; without it such values are misses.

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
        metadata: Optional["LMCacheMetadata"] = None,
    ) -> None:
        super().__init__(url, blocking_timeout_secs, retry_interval_secs, max_payload_bytes)
        scheme = url.split("://", 1)[0].lower()
        if scheme not in SCHEMES:
            raise ValueError(f"valkey connector url scheme must be one of {SCHEMES}, got {url!r}")
        self.one_key = scheme in ONE_KEY_SCHEMES
        self.layout = ChunkLayout.from_metadata(metadata) if metadata is not None else None
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

    def _parts(self, key: str) -> tuple[str, ...]:
        """The keys a chunk must have: (payload,) one-key, (payload, metadata) two-key."""
        if self.one_key:
            return (key,)
        return (key + PAYLOAD_SUFFIX, key + METADATA_SUFFIX)

    def _exists(self, key: str) -> bool:
        return self._batched_exists([key])[0]

    def _batched_exists(self, keys: list[str]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            if self.one_key:  # payload size and side key: a value is servable as it stands
                pipe.strlen(key)
                pipe.exists(key + SIDE_SUFFIX)
            else:
                pipe.exists(*self._parts(key))
        flags = pipe.execute()
        if not self.one_key:
            return [r == 2 for r in flags]
        return [one_key_servable(key, size, side, self.layout)
                for key, size, side in zip(keys, flags[::2], flags[1::2])]

    def _get(self, key: str) -> Optional[tuple[bytes, Buffer]]:
        pipe = self._client.pipeline(transaction=False)
        if self.one_key:
            pipe.get(key + SIDE_SUFFIX)
            pipe.get(key)
        else:
            pipe.get(key + METADATA_SUFFIX)
            pipe.get(key + PAYLOAD_SUFFIX)
        metadata, payload = pipe.execute()
        if payload is None:
            return None
        if metadata is None and self.one_key:
            metadata = full_chunk_metadata(key, self.layout)
        if metadata is None:
            return None
        return metadata, payload

    def _put(self, key: str, metadata: bytes, payload: Buffer) -> None:
        pipe = self._client.pipeline(transaction=True)
        for name, value in entry_writes(key, metadata, memoryview(payload).cast("B"), self.one_key):
            pipe.set(name, value)
        pipe.execute()

    def _remove(self, key: str) -> bool:
        extra = (key + SIDE_SUFFIX,) if self.one_key else ()
        return self._client.delete(*self._parts(key), *extra) > 0

    def _on_transport_error(self) -> None:
        self._pool.disconnect()

    def _close(self) -> None:
        self._client.close()
        self._pool.disconnect()
