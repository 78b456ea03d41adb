"""MemoryChunkIndex: the controller's chunk index in its own memory (the default option)."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Sequence

from lmcache.controller.chunk_index import ChunkIndex, Holder, WorkerInfo
from lmcache.controller.protocol import ADMIT, EVICT


def sum_or(values: Iterable[int]) -> int:
    """Bitwise OR of ``values`` (0 for none)."""
    out = 0
    for v in values:
        out |= v
    return out


class MemoryChunkIndex(ChunkIndex):
    """Dicts under one lock: ``chunk_hash → {(instance, worker): {locations}}`` and the reverse
    ``(instance, worker) → {location: {hashes}}`` (so dropping a worker costs its own entries
    only). Lost when the controller restarts: the workers' next heartbeat is answered
    "unknown", they re-register and send a full sync.

    For :meth:`held_prefixes` each worker with entries has a bit (its slot) and every chunk a
    bitmask of the workers holding it, per location: ``location → {chunk_hash → int}``; a
    prefix over n chunks is then n dict reads and integer ANDs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: dict[int, dict[tuple[str, int], set[str]]] = {}
        self._held: dict[tuple[str, int], dict[str, set[int]]] = {}
        self._workers: dict[tuple[str, int], WorkerInfo] = {}
        self._slots: dict[tuple[str, int], int] = {}  # worker -> its bit
        self._free: list[int] = []  # bits of removed workers, reused
        self._masks: dict[str, dict[int, int]] = {}  # location -> chunk hash -> worker bits

    def register(self, info: WorkerInfo) -> None:
        with self._lock:
            self._workers[(info.instance_id, info.worker_id)] = info
            self._held.setdefault((info.instance_id, info.worker_id), {})

    def heartbeat(self, instance_id: str, worker_id: int, now: float) -> bool:
        with self._lock:
            info = self._workers.get((instance_id, int(worker_id)))
            if info is None:
                return False
            info.last_heartbeat_time = now
            return True

    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            return [WorkerInfo(**w.to_dict()) for w in self._workers.values()]

    def remove_worker(self, instance_id: str, worker_id: int) -> int:
        who = (instance_id, int(worker_id))
        with self._lock:
            self._workers.pop(who, None)
            held = self._held.pop(who, {})
            dropped = 0
            for location, hashes in held.items():
                for h in hashes:
                    owners = self._chunks.get(h)
                    if owners is not None and owners.pop(who, None) is not None:
                        dropped += 1
                        if not owners:
                            del self._chunks[h]
                    self._unmark(who, location, h)
            slot = self._slots.pop(who, None)
            if slot is not None:
                self._free.append(slot)
            return dropped

    def _slot(self, who: tuple[str, int]) -> int:
        slot = self._slots.get(who)
        if slot is None:
            slot = self._slots[who] = self._free.pop() if self._free else len(self._slots)
        return slot

    def _unmark(self, who: tuple[str, int], location: str, h: int) -> None:
        masks = self._masks.get(location)
        if masks is not None and who in self._slots:
            m = masks.get(h, 0) & ~(1 << self._slots[who])
            if m:
                masks[h] = m
            else:
                masks.pop(h, None)

    def _add(self, who: tuple[str, int], location: str, h: int) -> None:
        self._chunks.setdefault(h, {}).setdefault(who, set()).add(location)
        self._held.setdefault(who, {}).setdefault(location, set()).add(h)
        masks = self._masks.setdefault(location, {})
        masks[h] = masks.get(h, 0) | 1 << self._slot(who)

    def _drop(self, who: tuple[str, int], location: str, h: int) -> None:
        owners = self._chunks.get(h)
        if owners is not None and who in owners:
            owners[who].discard(location)
            if not owners[who]:
                del owners[who]
            if not owners:
                del self._chunks[h]
        self._held.get(who, {}).get(location, set()).discard(h)
        self._unmark(who, location, h)

    def apply(self, instance_id: str, worker_id: int, location: str,
              ops: Sequence[tuple[int, int]]) -> None:
        who = (instance_id, int(worker_id))
        with self._lock:
            for op, h in ops:
                if op == ADMIT:
                    self._add(who, location, int(h))
                elif op == EVICT:
                    self._drop(who, location, int(h))

    def replace(self, instance_id: str, worker_id: int, location: str,
                hashes: Iterable[int]) -> None:
        who = (instance_id, int(worker_id))
        new = {int(h) for h in hashes}
        with self._lock:
            old = set(self._held.get(who, {}).get(location, set()))
            for h in old - new:
                self._drop(who, location, h)
            for h in new - old:
                self._add(who, location, h)

    def holders(self, hashes: Sequence[int]) -> list[list[Holder]]:
        with self._lock:
            out = []
            for h in hashes:
                owners = self._chunks.get(h)
                out.append([] if not owners else
                           [(i, w, loc) for (i, w), locs in owners.items() for loc in locs])
            return out

    def held_prefixes(self, hashes: Sequence[int],
                      locations: Collection[str] | None = None) -> dict[tuple[str, int], int]:
        with self._lock:
            slots = {who: self._slots.get(who) for who in self._workers}
            tables = [m for loc, m in self._masks.items()
                      if locations is None or loc in locations]
            if len(tables) == 1:
                get = tables[0].get
                masks = [get(h, 0) for h in hashes]
            else:
                gets = [t.get for t in tables]
                masks = [sum_or(g(h, 0) for g in gets) for h in hashes]
        out = dict.fromkeys(slots, 0)
        run = sum_or(1 << s for s in slots.values() if s is not None)
        for i, m in enumerate(masks):
            if run & m != run:  # some workers' prefixes end here
                gone, run = run & ~m, run & m
                for who, s in slots.items():
                    if s is not None and gone >> s & 1:
                        out[who] = i
                if not run:
                    return out
        for who, s in slots.items():
            if s is not None and run >> s & 1:
                out[who] = len(hashes)
        return out

    def num_entries(self) -> int:
        with self._lock:
            return sum(len(locs) for owners in self._chunks.values() for locs in owners.values())

    def chunks_of(self, instance_id: str, worker_id: int,
                  location: str | None = None) -> set[int]:
        with self._lock:
            held = self._held.get((instance_id, int(worker_id)), {})
            if location is not None:
                return set(held.get(location, set()))
            return set().union(*held.values()) if held else set()
