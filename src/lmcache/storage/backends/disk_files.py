"""Chunk files of the LocalDiskBackend (and of any tier that keeps one file per chunk).

A chunk file is the single-value layout of :mod:`lmcache.serde.wire.chunk_file`:
``b"LMCACHE2"`` | 56-byte metadata (28-byte LMCache header + lmcache's trailer: the writer's KV
layout and the xxh3_64 of key, header, trailer and payload) | payload. Its name is the key string
encoded with :func:`~lmcache.storage.backends.disk_names.key_to_filename` plus ``.kvc``; the
checksum covers that key, so a valid file copied or renamed to another key's name is a miss, and a file of another KV layout
(layers, heads, head size, dtype, MLA) is never loaded. Files are written to a
``.tmp-*`` name and renamed into place, so a complete name never holds a half-written file
unless the machine itself crashed — which the checksum then catches.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import uuid
import time
from typing import Optional, Union

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_obj import MemoryObj
from lmcache.serde.wire.chunk_file import FILE_HEADER_SIZE, FILE_MAGIC, split_file_header
from lmcache.serde.wire.chunk_layout import ChunkLayout, check_layout
from lmcache.serde.wire.metadata import (
    decode_metadata,
    finish_metadata,
    start_checksum,
    verify_state,
)
from lmcache.serde.wire.remote_metadata import RemoteMetadata, WireFormatError
from lmcache.storage.backends.disk_names import filename_to_key

logger = logging.getLogger(__name__)
Buffer = Union[bytes, bytearray, memoryview]

SUFFIX = ".kvc"
TMP_PREFIX = ".tmp-lmcache-"
_TMP_NAME = re.compile(r"\.tmp-lmcache-[0-9a-f]{32}")  # lmcache's own temporary files only


def tmp_name() -> str:
    """A new temporary file name of lmcache's own form (``.tmp-lmcache-<32 hex>``)."""
    return f"{TMP_PREFIX}{uuid.uuid4().hex}"


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` is one of lmcache's temporary files (other programs' are not)."""
    return _TMP_NAME.fullmatch(name) is not None
BLOCK = 1 << 20  # bytes read/written (and hashed) at a time: stays in cache between the two


def write_file(path: str, meta: RemoteMetadata, payload: memoryview, key: str = "",
               layout: Optional[ChunkLayout] = None) -> None:
    """Write a chunk file to ``path`` (a new file): the payload in BLOCK-sized pieces, each
    hashed just before it is written (cache-hot), then the header with the checksum at offset 0.

    Args:
        key: the key string the file is stored for (its name once renamed into place).
        layout: the writer's KV layout, recorded in the trailer.

    Raises:
        OSError: as raised by the OS (ENOSPC on a full disk, ...).
    """
    view = memoryview(payload).cast("B")
    state = start_checksum(meta, key, layout)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        offset = FILE_HEADER_SIZE
        for start in range(0, view.nbytes, BLOCK):
            block = view[start : start + BLOCK]
            state.update(block)
            _pwrite_all(fd, block, offset)
            offset += block.nbytes
        _pwrite_all(fd, FILE_MAGIC + finish_metadata(meta, state, layout), 0)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def read_into(path: str, obj: MemoryObj, max_payload_bytes: int,
              layout: Optional[ChunkLayout] = None,
              expect: Optional[RemoteMetadata] = None) -> Optional[str]:
    """Fill ``obj`` (a CPU MemoryObj of the chunk's size) from ``path``, verifying every byte
    and that the file belongs to the key its name encodes and (when given) to ``layout``, and
    that its header describes the same format, dtype and shape as ``expect`` (when given).

    The payload is read straight into ``obj.byte_array`` in BLOCK-sized pieces, each hashed
    (xxh3_64, which releases the GIL) right after it is read, while it is still in the CPU
    cache. The header and the first piece come in one vectored read, so the kernel's
    readahead sees a BLOCK-sized sequential read from the first call (a 44-byte first read
    makes it start with a small window, which costs cold reads) and later reads start at
    BLOCK-aligned file offsets. Bytes are read into ``obj`` before the header is checked; the
    caller must not use ``obj`` unless this returns None.

    Returns None when the file is complete and its checksum matches, else a short description
    of what is wrong (the caller treats the chunk as a miss).

    Raises:
        OSError: the file cannot be opened or read (FileNotFoundError when it is gone).
    """
    view = obj.byte_array
    header = bytearray(FILE_HEADER_SIZE)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        got = os.readv(f.fileno(), [header, view[: min(BLOCK - len(header), obj.nbytes)]])
        try:
            if got < len(header):
                raise WireFormatError(f"file of {size} bytes has no complete header")
            metadata = split_file_header(header)
            meta, trailer = decode_metadata(metadata, max_payload_bytes)
            if layout is not None:
                check_layout(meta, trailer, layout)
            key = filename_to_key(os.path.basename(path), SUFFIX)
        except ValueError as e:
            return f"corrupt ({e})"
        if meta.length != obj.nbytes or size != FILE_HEADER_SIZE + obj.nbytes:
            return f"truncated or mismatched ({size} bytes)"
        if expect is not None and (meta.fmt, meta.dtype, tuple(meta.shape)) != (
                expect.fmt, expect.dtype, tuple(expect.shape)):
            return (f"of another shape ({meta.fmt.name} {meta.dtype} {tuple(meta.shape)}, "
                    f"indexed as {expect.fmt.name} {expect.dtype} {tuple(expect.shape)})")
        if trailer is None:
            return "corrupt (no checksum)"
        digest = trailer.checksum
        state = verify_state(metadata, key)
        got -= len(header)
        state.update(view[:got])
        while got < obj.nbytes:
            n = f.readinto(view[got : got + BLOCK])
            if not n:
                return "truncated"
            state.update(view[got : got + n])
            got += n
    if state.intdigest() != digest:
        return "corrupt (checksum mismatch)"
    return None


def scan(
    directory: str, max_payload_bytes: int, layout: Optional[ChunkLayout] = None
) -> list[tuple[CacheEngineKey, RemoteMetadata, int]]:
    """Index the chunk files of ``directory``, oldest first: (key, metadata, file size).

    Reads only the 64-byte headers. Touches only lmcache's own files: deletes leftover
    temporary files of lmcache's form (:func:`is_tmp_name`; writes interrupted by a crash) and
    chunk files (names that decode to a key) that are torn (size disagrees with the header) or
    have a bad header; chunk files of another KV layout than ``layout`` (when given) are left
    alone and not indexed; every other file (other programs' temporary files, names that are
    not an encoded key) is left alone.
    """
    found = []
    for entry in os.scandir(directory):
        if is_tmp_name(entry.name):
            unlink(entry.path)
            continue
        if not entry.name.endswith(SUFFIX) or not entry.is_file():
            continue
        try:
            key = CacheEngineKey.from_string(filename_to_key(entry.name, SUFFIX))
        except ValueError:
            continue  # not a name lmcache writes: not ours
        try:
            with open(entry.path, "rb") as f:
                header = f.read(FILE_HEADER_SIZE)
            meta, trailer = decode_metadata(split_file_header(header), max_payload_bytes)
            if layout is not None:
                try:
                    check_layout(meta, trailer, layout)
                except WireFormatError as e:
                    logger.warning("disk chunk file %s is not indexed: %s", entry.name, e)
                    continue
            st = entry.stat()
            if st.st_size != FILE_HEADER_SIZE + meta.length:
                raise WireFormatError(
                    f"file is {st.st_size} bytes, header says {FILE_HEADER_SIZE + meta.length}"
                )
        except (ValueError, OSError) as e:
            logger.warning("removing bad disk chunk file %s: %s", entry.name, e)
            unlink(entry.path)
            continue
        found.append((st.st_mtime_ns, entry.name, key, meta, st.st_size))
    found.sort(key=lambda t: (t[0], t[1]))
    return [(key, meta, size) for _, _, key, meta, size in found]


def unlink(path: str) -> None:
    """Remove ``path`` if it can be removed (no error when it is already gone)."""
    try:
        os.unlink(path)
    except OSError:
        pass


class FullDiskGate:
    """Stops a tier's admissions after the disk reports it is full (ENOSPC, EDQUOT, EFBIG),
    logging one warning per episode, and reopens once ``statvfs`` shows free space for two
    more chunks (checked at most every ``retry_secs`` seconds)."""

    FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

    def __init__(self, path: str, retry_secs: float) -> None:
        if retry_secs < 0:
            raise ValueError(f"disk_full_retry_secs must be >= 0, got {retry_secs!r}")
        self.path = path
        self.retry_secs = float(retry_secs)
        self.full = False
        self.episodes = 0
        self._next_check = 0.0
        self._lock = threading.Lock()

    def trip(self, error: OSError) -> bool:
        """Record a failed write; True when ``error`` means the disk is full."""
        if error.errno not in self.FULL_ERRNOS:
            return False
        with self._lock:
            if not self.full:
                self.full = True
                self.episodes += 1
                self._next_check = time.monotonic() + self.retry_secs
                logger.warning("disk %s is full (%s); the disk tier admits nothing until space "
                               "is free again", self.path, error)
        return True

    def admits(self, size: int) -> bool:
        """False while full, unless free space for 2 x ``size`` bytes is back (then reopens)."""
        if not self.full:
            return True
        with self._lock:
            now = time.monotonic()
            if not self.full or now < self._next_check:
                return not self.full
            self._next_check = now + self.retry_secs
            try:
                st = os.statvfs(self.path)
            except OSError:
                return False
            if st.f_bavail * st.f_frsize < 2 * size:
                return False
            self.full = False
        logger.warning("disk %s has free space again; the disk tier admits chunks", self.path)
        return True
