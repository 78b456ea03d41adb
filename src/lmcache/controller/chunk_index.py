"""ChunkIndex: the controller's global index chunk hash → (instance, worker, tier), and the
registry of workers. Options: ``index/memory.py`` (the controller's memory, default) and
``index/valkey.py`` (a Valkey server: a restarted controller loses nothing and several
controllers can serve one fleet).

Chunk hashes are LMCache's int ``chunk_hash`` (the token database's prefix hash), the same on
every instance of one model and hash configuration; the full key (model, world size, worker,
dtype) is checked by the peer that serves a chunk, so the index only needs the hash.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Holder = tuple[str, int, str]
"""(instance_id, worker_id, location) — location is a tier name, e.g. ``LocalCPUBackend``."""


@dataclass
class WorkerInfo:
    """One registered worker (LMCache's WorkerInfo plus what lmcache's P2P needs).

    Attributes:
        instance_id, worker_id: who (worker_id = the tensor-parallel rank).
        ip, port: where the worker answers the controller's commands (ZMQ REP).
        peer_init_url: ``host:port`` where its P2P backend serves peers (None without P2P).
        registration_time, last_heartbeat_time: seconds since the epoch.
        model_name: the model it serves; tiers: its tier names, in tier order.
    """

    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None = None
    registration_time: float = 0.0
    last_heartbeat_time: float = 0.0
    model_name: str = ""
    tiers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorkerInfo":
        """Raises ValueError on a malformed map (missing or mistyped fields)."""
        try:
            info = cls(instance_id=str(d["instance_id"]), worker_id=int(d["worker_id"]),
                       ip=str(d["ip"]), port=int(d["port"]),
                       peer_init_url=(None if d.get("peer_init_url") is None
                                      else str(d["peer_init_url"])),
                       registration_time=float(d.get("registration_time", 0.0)),
                       last_heartbeat_time=float(d.get("last_heartbeat_time", 0.0)),
                       model_name=str(d.get("model_name", "")),
                       tiers=[str(t) for t in d.get("tiers", [])])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed worker info {d!r}: {e}") from None
        if not info.instance_id:
            raise ValueError("worker info without an instance_id")
        return info


class ChunkIndex(abc.ABC):
    """Thread-safe index of who holds which chunk, and of the registered workers."""

    @abc.abstractmethod
    def register(self, info: WorkerInfo) -> None:
        """Add or replace a worker (its chunks are kept: a re-registration re-syncs them)."""

    @abc.abstractmethod
    def heartbeat(self, instance_id: str, worker_id: int, now: float) -> bool:
        """Record a heartbeat; False when the worker is not registered."""

    @abc.abstractmethod
    def workers(self) -> list[WorkerInfo]:
        """Every registered worker (heartbeat times current)."""

    @abc.abstractmethod
    def remove_worker(self, instance_id: str, worker_id: int) -> int:
        """Drop a worker and every chunk entry of it; returns the entries dropped."""

    @abc.abstractmethod
    def apply(self, instance_id: str, worker_id: int, location: str,
              ops: Sequence[tuple[int, int]]) -> None:
        """Apply admit/evict events ``[(ADMIT|EVICT, chunk_hash), ...]`` in order."""

    @abc.abstractmethod
    def replace(self, instance_id: str, worker_id: int, location: str,
                hashes: Iterable[int]) -> None:
        """Full sync: the tier ``location`` of the worker holds exactly ``hashes``."""

    @abc.abstractmethod
    def holders(self, hashes: Sequence[int]) -> list[list[Holder]]:
        """For each hash, every (instance, worker, location) holding it."""

    def held_prefixes(self, hashes: Sequence[int],
                      locations: Collection[str] | None = None) -> dict[tuple[str, int], int]:
        """For each registered worker ``(instance_id, worker_id)``: how many leading ``hashes``
        it holds, each in some tier (in one of ``locations`` when given). This default makes
        one pass over :meth:`holders`; an option may answer it faster."""
        out = {(w.instance_id, w.worker_id): 0 for w in self.workers()}
        alive = set(out)
        for i, holders in enumerate(self.holders(hashes) if alive else ()):
            here = {(inst, wid) for inst, wid, loc in holders
                    if locations is None or loc in locations}
            for who in alive - here:
                out[who] = i
            alive &= here
            if not alive:
                break
        for who in alive:
            out[who] = len(hashes)
        return out

    @abc.abstractmethod
    def num_entries(self) -> int:
        """(chunk, worker, location) entries in the index."""

    def chunks_of(self, instance_id: str, worker_id: int,
                  location: str | None = None) -> set[int]:
        """Hashes a worker holds (in ``location``, or any tier)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (idempotent)."""
