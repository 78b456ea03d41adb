"""FSConnector: the ``fs://`` remote, one file per chunk on a (shared) filesystem path, in
LMCache 0.5.6's file names and layout."""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Optional

from lmcache.keys import CacheEngineKey
from lmcache.serde.wire.metadata import TRAILER_SIZE, trailer_bytes
from lmcache.serde.wire.remote_metadata import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    HEADER,
    LMCACHE_METADATA_SIZE,
)
from lmcache.storage import name_limits
from lmcache.storage.connectors.base import Buffer, RemoteConnector

if TYPE_CHECKING:
    from lmcache.metadata import LMCacheMetadata

SUFFIX = ".data"
SEP = "-SEP-"
TMP_PREFIX = ".tmp-"
MAX_NAME_BYTES = 255


def _paths_of(url: str) -> list[str]:
    rest = url.split("://", 1)[1]
    first, sep, tail = rest.partition("/")
    host, colon, port = first.rpartition(":")
    if first and colon and host and port.isdigit():  # LMCache-style fs://host:port/path
        rest = sep + tail
    return [p.strip() for p in rest.split(",") if p.strip()]


def file_name(key: str) -> str:
    """LMCache's file name of a key string: ``/`` → ``-SEP-``, then ``.data``.

    Raises:
        ValueError: NUL in the key or a name longer than 255 bytes (no filesystem holds it).
    """
    name = key.replace("/", SEP) + SUFFIX
    if "\0" in key or not key or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"key {key!r} gives no valid file name (empty, NUL, or > 255 bytes)")
    return name


class FSConnector(RemoteConnector):
    """Chunks as files, as LMCache's FSConnector (with its default ``save_chunk_meta: true``)
    writes them: ``<path>/<key, / → -SEP->.data`` holding LMCache's 28-byte header, then the
    payload. lmcache appends its 28-byte trailer (layout and checksum, see
    :mod:`lmcache.serde.wire`) after the payload: LMCache reads exactly the header's
    length of payload and ignores it. A file without the trailer (LMCache's) is checked by
    size only.

    With several comma-separated paths a key goes to ``paths[abs(chunk_hash) % n]``, as in
    LMCache. A write goes to a temporary file in the same directory and is renamed into place
    (atomic on POSIX), so readers never see a torn file from a live writer; a file that is
    torn anyway (crash, full disk) fails verification and is a miss.

    Args:
        url: ``fs://<path>[,<path>...]`` (``fs:///abs/dir``; LMCache's
            ``fs://host:port/abs/dir`` is accepted and host:port ignored). Directories are
            created when missing.
        blocking_timeout_secs, retry_interval_secs, max_payload_bytes: see RemoteConnector.
        metadata: this worker's LMCacheMetadata (injected): the longest file name and path of
            its keys are checked against each directory's NAME_MAX / PATH_MAX at start.

    Raises:
        ValueError: a url that is not ``fs://`` or has an empty path; file names or paths of
            this ``metadata`` longer than a directory's file system allows (``name_limits``).
    """

    name = "fs"

    def __init__(
        self,
        url: str,
        blocking_timeout_secs: float = 10.0,
        retry_interval_secs: float = 1.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        metadata: Optional["LMCacheMetadata"] = None,
    ) -> None:
        super().__init__(url, blocking_timeout_secs, retry_interval_secs, max_payload_bytes)
        if not url.startswith("fs://") or not _paths_of(url):
            raise ValueError(f"fs connector url must be fs://<path>, got {url!r}")
        self.paths = [os.path.abspath(p) for p in _paths_of(url)]
        self.path = self.paths[0]
        for path in self.paths if metadata is not None else ():
            name_limits.check_file_names(path, name_limits.longest_keys(metadata), file_name,
                                         [f"{TMP_PREFIX}{uuid.uuid4().hex}"], "remote_url fs://")
        for path in self.paths:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError:
                pass  # not mounted yet: puts fail (and retry) until it is

    def _dir(self, key: str) -> str:
        if len(self.paths) == 1:
            return self.path
        chunk_hash = CacheEngineKey.from_string(key).chunk_hash
        return self.paths[abs(chunk_hash) % len(self.paths)]

    def _file(self, key: str) -> str:
        return os.path.join(self._dir(key), file_name(key))

    def _exists(self, key: str) -> bool:
        return os.path.isfile(self._file(key))

    def _get(self, key: str) -> Optional[tuple[bytes, Buffer]]:
        try:
            f = open(self._file(key), "rb", buffering=0)
        except FileNotFoundError:
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            limit = LMCACHE_METADATA_SIZE + self.max_payload_bytes + TRAILER_SIZE
            if not LMCACHE_METADATA_SIZE <= size <= limit:
                return None
            buf = bytearray(size)
            view = memoryview(buf)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    return None  # truncated under us
                got += n
        header = bytes(view[:LMCACHE_METADATA_SIZE])
        length = HEADER.unpack_from(header)[0]
        end = LMCACHE_METADATA_SIZE + length
        if length >= 0 and size == end + TRAILER_SIZE:  # lmcache's: trailer after the payload
            return header + bytes(view[end:]), view[LMCACHE_METADATA_SIZE:end]
        return header, view[LMCACHE_METADATA_SIZE:]  # LMCache's (the size is checked later)

    def _put(self, key: str, metadata: bytes, payload: Buffer) -> None:
        final = self._file(key)
        directory = os.path.dirname(final)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        parts = (metadata[:LMCACHE_METADATA_SIZE], payload, trailer_bytes(metadata)
                 if len(metadata) > LMCACHE_METADATA_SIZE else b"")
        try:
            with open(tmp, "wb", buffering=0) as f:
                for part in parts:
                    view = memoryview(part).cast("B")
                    while view.nbytes:
                        view = view[f.write(view):]
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _remove(self, key: str) -> bool:
        try:
            os.unlink(self._file(key))
            return True
        except FileNotFoundError:
            return False
