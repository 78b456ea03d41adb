"""PullMemory: the local memory of the P2P tier's pulls — allocated in the CPU tier with the
layout the peer announced (checked against this worker's model), partly ahead of the peer's
answer, and quarantined after a failed read.

Allocating 8 chunk objects costs ~0.5-1 ms of Python; :meth:`PullMemory.guess` allocates them
while the peer's ``acquire`` answer is on its way (in the layout of the last pull's first chunk,
without evicting: the peer may hold fewer chunks than asked) and :meth:`PullMemory.allocate`
keeps the guesses whose layout matches, frees the others and allocates the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch

from lmcache.keys import name_to_dtype
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata

logger = logging.getLogger(__name__)

_FORMATS = (int(MemoryFormat.KV_2LTD), int(MemoryFormat.KV_T2D), int(MemoryFormat.KV_MLA_FMT),
            int(MemoryFormat.BINARY))


class PullMemory:
    """Args:
        cpu: the CPU tier (LocalCPUBackend: ``allocate(shape, dtype, fmt, evict=...)``).
        metadata: this worker's KV layout (dtype, layers, chunk size, hidden size).
        stats: counts ``layout_mismatches`` in this dict.
    """

    def __init__(self, cpu: Any, metadata: LMCacheMetadata, stats: dict) -> None:
        self.cpu, self.metadata, self.stats = cpu, metadata, stats
        self._layout: Optional[tuple[list, torch.dtype, MemoryFormat]] = None  # of the last pull
        self._lock = threading.Lock()
        self._quarantine: list[tuple[float, list[MemoryObj]]] = []

    def expected(self, shape: list, dtype: torch.dtype, fmt: int) -> bool:
        """Whether a chunk of ``shape``/``dtype``/``fmt`` can be this worker's KV (KV_2LTD:
        ``[2, num_layers, tokens <= chunk_size, hidden_dim]`` of ``kv_dtype``)."""
        md = self.metadata
        if dtype != md.kv_dtype or fmt not in _FORMATS:
            return False
        if fmt == int(MemoryFormat.KV_2LTD):
            return (len(shape) == 4 and shape[0] == 2 and shape[1] == md.num_layers
                    and 0 < shape[2] <= md.chunk_size and shape[3] == md.hidden_dim)
        return all(isinstance(s, int) and s > 0 for s in shape)

    def guess(self, n: int) -> list[MemoryObj]:
        """Up to ``n`` objects (ref_count 1) of the last pull's first chunk layout, without
        evicting; [] before the first pull."""
        guess: list[MemoryObj] = []
        if self._layout is not None:
            shape, dtype, fmt = self._layout
            try:
                while len(guess) < n:
                    obj = self.cpu.allocate(shape, dtype, fmt, evict=False)
                    if obj is None:
                        break
                    guess.append(obj)
            except Exception as e:  # noqa: BLE001 - then the pull allocates after the answer
                logger.warning("P2P: allocating ahead of the peer's answer failed: %s", e)
        return guess

    def allocate(self, chunks: list, guess: list[Optional[MemoryObj]]) -> list[MemoryObj]:
        """Objects for the acquired ``chunks`` (``[offset, nbytes, shape, dtype name, fmt]``
        each): a prefix, up to the first chunk of an unexpected layout (counted) or that does
        not fit. ``guess[i]`` is used for chunk i when its layout matches; every guess not
        used is freed. Raises ValueError on an unknown dtype name."""
        objs: list[MemoryObj] = []
        try:
            for i, (_, nbytes, shape, dtype_name, fmt) in enumerate(chunks):
                shape, dtype, fmt = list(shape), name_to_dtype(dtype_name), int(fmt)
                if not self.expected(shape, dtype, fmt):
                    self.stats["layout_mismatches"] += 1
                    break
                if i == 0:
                    self._layout = (shape, dtype, MemoryFormat(fmt))
                obj = guess[i] if i < len(guess) else None
                if i < len(guess):
                    guess[i] = None  # (taken, or freed here)
                if obj is not None and (list(obj.shape) != shape or obj.dtype != dtype
                                        or int(obj.fmt) != fmt):
                    obj.ref_count_down()
                    obj = None
                if obj is None:
                    obj = self.cpu.allocate(shape, dtype, MemoryFormat(fmt))
                    if obj is None:
                        break
                if obj.nbytes != nbytes:
                    obj.ref_count_down()
                    self.stats["layout_mismatches"] += 1
                    break
                objs.append(obj)
        finally:
            free([g for g in guess if g is not None])
        return objs

    def quarantine(self, objs: list[MemoryObj], secs: float) -> None:
        """Hold ``objs`` (a failed read's memory, which a stalled transfer may still write)
        for ``secs`` seconds before freeing them (:meth:`purge`)."""
        with self._lock:
            self._quarantine.append((time.monotonic() + secs, objs))

    def purge(self, everything: bool = False) -> None:
        """Free the quarantined objects whose time is up (``everything``: all of them)."""
        now = time.monotonic()
        with self._lock:
            due = [objs for t, objs in self._quarantine if everything or t <= now]
            self._quarantine = [] if everything else [
                (t, o) for t, o in self._quarantine if t > now]
        for objs in due:
            free(objs)


def free(objs: Sequence[MemoryObj]) -> None:
    """Drop the caller's reference of each object."""
    for obj in objs:
        obj.ref_count_down()
