"""LinkLog: the disk tier's prefix links (child chunk → parent chunk), kept across restarts.

The disk tier evicts from the tail of a prefix (:class:`PrefixChain`); the links it needs come
from the stores. So that a restarted tier still evicts tail first, each link of a chunk file is
appended to ``<local_disk>/.lmcache-prefix-links`` when the chunk's file is written (one JSON
line ``["<child key>", "<parent key>"]``, the last line of a child wins; a chained hash
determines its parent, so an old line never names a wrong one). At start the tier reads the
log, keeps the links whose two chunk files it indexed, and rewrites the log with only those
(atomically: a temporary file of lmcache's form, then a rename); while running the log is
rewritten the same way when it holds far more lines than live links. A torn or foreign line
is skipped. Links are an eviction hint: a log that cannot be read or written costs only
tail-first eviction of the chunks concerned (counted in ``errors``, logged once), never a
chunk.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Optional, TextIO

from lmcache.keys import CacheEngineKey
from lmcache.storage.backends import disk_files

logger = logging.getLogger(__name__)

NAME = ".lmcache-prefix-links"


class LinkLog:
    """Append-only log of prefix links in ``directory`` (see the module docstring). Not
    thread-safe: the owning tier calls it under its lock.

    Attributes:
        lines: lines in the log now (read at start plus appended).
        errors: reads or writes of the log that failed.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, NAME)
        self.lines = 0
        self.errors = 0
        self._file: Optional[TextIO] = None
        self._warned = False

    def load(self) -> dict[CacheEngineKey, CacheEngineKey]:
        """The links in the log (child → parent; the last line of a child wins)."""
        links: dict[CacheEngineKey, CacheEngineKey] = {}
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    self.lines += 1
                    try:
                        child, parent = json.loads(line)
                        links[CacheEngineKey.from_string(child)] = \
                            CacheEngineKey.from_string(parent)
                    except (ValueError, TypeError):
                        continue  # a torn last line (crash) or not ours
        except FileNotFoundError:
            pass
        except OSError as e:
            self._failed("read", e)
        return links

    def append(self, child: CacheEngineKey, parent: CacheEngineKey) -> None:
        """Add the link of ``child`` (one line, written through)."""
        try:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8", buffering=1)
            self._file.write(json.dumps([child.to_string(), parent.to_string()]) + "\n")
            self.lines += 1
        except OSError as e:
            self._failed("append to", e)

    def rewrite(self, links: Iterable[tuple[CacheEngineKey, CacheEngineKey]]) -> None:
        """Replace the log by exactly ``links`` (temporary file, then an atomic rename; no
        links: no file)."""
        self.close()
        lines = [json.dumps([c.to_string(), p.to_string()]) + "\n" for c, p in links]
        tmp = os.path.join(os.path.dirname(self.path), disk_files.tmp_name())
        try:
            if not lines:
                if os.path.lexists(self.path):
                    os.unlink(self.path)
            else:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(lines)
                os.replace(tmp, self.path)
            self.lines = len(lines)
        except OSError as e:
            disk_files.unlink(tmp)
            self._failed("rewrite", e)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                self._failed("close", e)
            self._file = None

    def _failed(self, what: str, error: OSError) -> None:
        self.errors += 1
        if not self._warned:
            self._warned = True
            logger.warning("cannot %s the disk tier's prefix links %s: %s (eviction after a "
                           "restart may not go tail first; further errors only counted)",
                           what, self.path, error)
