"""ValkeyClusterConnector: the ``valkey-cluster://`` remote, sharded over a Valkey Cluster."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional
from urllib.parse import unquote

import valkey.exceptions as vexc
from valkey.cluster import ClusterNode, ValkeyCluster

from lmcache.serde.wire.chunk_layout import ChunkLayout
from lmcache.serde.wire.remote_metadata import DEFAULT_MAX_PAYLOAD_BYTES
from lmcache.storage.connectors.base import Buffer, RemoteConnector
from lmcache.storage.connectors.valkey import (
    METADATA_SUFFIX,
    PAYLOAD_SUFFIX,
    SIDE_SUFFIX,
    TRANSPORT_ERRORS,
    client_options,
    entry_writes,
    full_chunk_metadata,
    one_key_servable,
)

if TYPE_CHECKING:
    from lmcache.metadata import LMCacheMetadata

ONE_KEY_SCHEMES = ("valkey-cluster", "valkeys-cluster")
SCHEMES = ONE_KEY_SCHEMES + ("redis-cluster", "rediss-cluster")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], Optional[str], Optional[str]]:
    """``scheme://[user[:password]@]h1:p1,h2:p2,...`` → (nodes, username, password).

    Raises:
        ValueError: unknown scheme, no node, or a node without a numeric port.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError(f"valkey cluster url scheme must be one of {SCHEMES}, got {url!r}")
    rest = rest.split("/", 1)[0].split("?", 1)[0]
    userinfo, at, hosts = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"cluster node {item!r} in {url!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return nodes, username, password


class ValkeyClusterConnector(RemoteConnector):
    """A Valkey Cluster (slots spread over several primaries), in LMCache 0.5.6's layouts:

    * ``redis-cluster://`` (LMCache's RedisClusterConnector): ``<key>kv_bytes`` written before
      ``<key>metadata`` (56 bytes; LMCache reads the first 28). The two keys may live on
      different nodes, so presence is one ``EXISTS`` of both (split over their slots by the
      client) and the checksum in the metadata guards a get.
    * ``valkey-cluster://`` (LMCache's GLIDE ValkeyConnector with ``valkey_mode: cluster``):
      ``<key>`` holds the raw payload; lmcache's metadata is in the side key
      ``<key>lmc_meta``, written first; a value without one (LMCache's) is read as a full chunk
      of this instance's layout, as in :class:`ValkeyConnector` (and counted only when its
      size is a full chunk's).

    The cluster client is built lazily, so a cluster that is down at start costs hits, not a
    failed startup. After a transport error the client is discarded and rebuilt from the url's
    nodes on the next attempt (valkey-py drops unreachable startup nodes from its own list, so
    reusing it could never reconnect after a full outage).

    Args:
        url: ``valkey-cluster://[user[:password]@]host1:port1,host2:port2`` (also
            ``redis-cluster://``; ``valkeys-cluster://`` / ``rediss-cluster://`` use TLS).
        blocking_timeout_secs, retry_interval_secs, max_payload_bytes: see RemoteConnector.
        username, password, tls, tls_ca_certs, tls_certfile, tls_keyfile, tls_check_hostname:
            as for ValkeyConnector (no ``db``: clusters have only database 0).

    Raises:
        ValueError: a malformed url.
    """

    name = "valkey_cluster"
    transport_errors = TRANSPORT_ERRORS + (vexc.ClusterError, vexc.ValkeyClusterException,
                                           vexc.ClusterDownError, vexc.SlotNotCoveredError)

    def __init__(
        self,
        url: str,
        blocking_timeout_secs: float = 10.0,
        retry_interval_secs: float = 1.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        username: Optional[str] = None,
        password: Optional[str] = None,
        tls: bool = False,
        tls_ca_certs: Optional[str] = None,
        tls_certfile: Optional[str] = None,
        tls_keyfile: Optional[str] = None,
        tls_check_hostname: bool = True,
        metadata: Optional["LMCacheMetadata"] = None,
    ) -> None:
        super().__init__(url, blocking_timeout_secs, retry_interval_secs, max_payload_bytes)
        self.nodes, url_user, url_password = parse_cluster_url(url)
        self.one_key = url.split("://", 1)[0].lower() in ONE_KEY_SCHEMES
        self.layout = ChunkLayout.from_metadata(metadata) if metadata is not None else None
        tls = tls or url.lower().startswith(("valkeys-", "rediss-"))
        self._options = client_options(
            self.blocking_timeout_secs,
            username if username is not None else url_user,
            password if password is not None else url_password,
            tls, tls_ca_certs, tls_certfile, tls_keyfile, tls_check_hostname,
        )
        if tls:
            self._options["ssl"] = True
        self._client: Optional[ValkeyCluster] = None
        self._client_lock = threading.Lock()

    def _cluster(self) -> ValkeyCluster:
        client = self._client
        if client is not None:
            return client
        with self._client_lock:
            if self._client is None:
                self._client = ValkeyCluster(
                    startup_nodes=[ClusterNode(h, p) for h, p in self.nodes],
                    cluster_error_retry_attempts=0,
                    require_full_coverage=False,
                    **self._options,
                )
            return self._client

    def _parts(self, key: str) -> tuple[str, ...]:
        if self.one_key:
            return (key,)
        return (key + PAYLOAD_SUFFIX, key + METADATA_SUFFIX)

    def _exists(self, key: str) -> bool:
        return self._batched_exists([key])[0]

    def _batched_exists(self, keys: list[str]) -> list[bool]:
        pipe = self._cluster().pipeline()
        for key in keys:
            if self.one_key:
                pipe.strlen(key)
                pipe.exists(key + SIDE_SUFFIX)
            else:
                for part in self._parts(key):
                    pipe.exists(part)
        flags = pipe.execute()
        if self.one_key:
            return [one_key_servable(key, size, side, self.layout)
                    for key, size, side in zip(keys, flags[::2], flags[1::2])]
        return [flags[2 * i] == 1 and flags[2 * i + 1] == 1 for i in range(len(keys))]

    def _get(self, key: str) -> Optional[tuple[bytes, Buffer]]:
        client = self._cluster()
        if self.one_key:
            payload = client.get(key)
            if payload is None:
                return None
            metadata = client.get(key + SIDE_SUFFIX) or full_chunk_metadata(key, self.layout)
            return (metadata, payload) if metadata is not None else None
        metadata = client.get(key + METADATA_SUFFIX)
        if metadata is None:
            return None
        payload = client.get(key + PAYLOAD_SUFFIX)
        if payload is None:
            return None
        return metadata, payload

    def _put(self, key: str, metadata: bytes, payload: Buffer) -> None:
        client = self._cluster()
        for name, value in entry_writes(key, metadata, memoryview(payload).cast("B"), self.one_key):
            client.set(name, value)

    def _remove(self, key: str) -> bool:
        client = self._cluster()
        extra = (key + SIDE_SUFFIX,) if self.one_key else ()
        return sum(client.delete(part) for part in (*self._parts(key), *extra)) > 0

    def _on_transport_error(self) -> None:
        self._close()

    def _close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
