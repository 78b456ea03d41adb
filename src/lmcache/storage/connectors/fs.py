"""FSConnector: the ``fs://`` remote, one file per chunk on a (shared) filesystem path."""

from __future__ import annotations

import os
import uuid
from typing import Optional

from lmcache.storage.connectors.base import Buffer, RemoteConnector
from lmcache.storage.connectors.wire_format import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    FILE_HEADER_SIZE,
    FILE_MAGIC,
    WireFormatError,
    key_to_filename,
    split_file_header,
)

SUFFIX = ".lmc"


def _path_of(url: str) -> str:
    rest = url.split("://", 1)[1]
    first, sep, tail = rest.partition("/")
    host, colon, port = first.rpartition(":")
    if first and colon and host and port.isdigit():  # LMCache-style fs://host:port/path
        rest = sep + tail
    return rest


class FSConnector(RemoteConnector):
    """Chunks as files ``<path>/<encoded key>.lmc`` holding one ``wire_format`` blob
    (magic, 36-byte metadata, payload). Key names are encoded reversibly
    (:func:`wire_format.key_to_filename`). A write goes to a temporary file in the same
    directory and is renamed into place (atomic on POSIX), so readers never see a torn file
    from a live writer; a file that is torn anyway (crash, full disk) fails verification and is
    a miss.

    Args:
        url: ``fs://<path>`` (``fs:///abs/dir``; an LMCache-style ``fs://host:port/abs/dir`` is
            accepted and host:port ignored). The directory is created when missing.
        blocking_timeout_secs, retry_interval_secs, max_payload_bytes: see RemoteConnector.

    Raises:
        ValueError: a url that is not ``fs://`` or has an empty path.
    """

    name = "fs"

    def __init__(
        self,
        url: str,
        blocking_timeout_secs: float = 10.0,
        retry_interval_secs: float = 1.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        super().__init__(url, blocking_timeout_secs, retry_interval_secs, max_payload_bytes)
        if not url.startswith("fs://") or not _path_of(url):
            raise ValueError(f"fs connector url must be fs://<path>, got {url!r}")
        self.path = os.path.abspath(_path_of(url))
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError:
            pass  # not mounted yet: puts fail (and retry) until it is

    def _file(self, key: str) -> str:
        return os.path.join(self.path, key_to_filename(key, SUFFIX))

    def _exists(self, key: str) -> bool:
        return os.path.isfile(self._file(key))

    def _get(self, key: str) -> Optional[tuple[bytes, Buffer]]:
        try:
            f = open(self._file(key), "rb", buffering=0)
        except FileNotFoundError:
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            if not FILE_HEADER_SIZE <= size <= FILE_HEADER_SIZE + self.max_payload_bytes:
                return None
            buf = bytearray(size)
            view = memoryview(buf)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    return None  # truncated under us
                got += n
        try:
            metadata = split_file_header(buf)
        except WireFormatError:
            return None
        return metadata, view[FILE_HEADER_SIZE:]

    def _put(self, key: str, metadata: bytes, payload: Buffer) -> None:
        final = self._file(key)
        os.makedirs(self.path, exist_ok=True)
        tmp = os.path.join(self.path, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb", buffering=0) as f:
                for part in (FILE_MAGIC + metadata, payload):
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
