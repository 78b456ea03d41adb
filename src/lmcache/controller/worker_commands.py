"""WorkerCommands: the controller's commands to one LMCacheWorker — ``clear`` (a tier, or the
chunks of some tokens), ``pin`` (the leading chunks of some tokens in a tier), ``move`` (copy
chunks between this instance's tiers, or pull them from another instance through the P2P tier;
``remove_source`` drops them from a local source afterwards) and ``health``. Replies are maps
with ``num_tokens`` (LMCache's controller message fields); a bad location or op raises
ValueError, which the worker turns into an ``{"error"}`` reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmcache.storage.manager import StorageManager
from lmcache.token_database.base import TokenDatabase


class WorkerCommands:
    """Args:
        storage_manager: the worker's tiers (``backends``, ``tier_names``).
        token_database: turns a command's tokens into chunk keys.
        chunk_size: tokens per chunk (a cleared tier's chunk count -> tokens).
        instance_id: this instance (a ``move`` whose ``src_instance`` is another one pulls
            through the P2P tier).
    """

    def __init__(self, storage_manager: StorageManager, token_database: TokenDatabase,
                 chunk_size: int, instance_id: str) -> None:
        self.storage_manager = storage_manager
        self.token_database = token_database
        self.chunk_size = int(chunk_size)
        self.instance_id = instance_id

    def _tiers(self, location: str) -> list:
        if location in (None, "", "all"):
            return list(self.storage_manager.backends)
        tiers = [t for t in self.storage_manager.backends if t.name == location]
        if not tiers:
            raise ValueError(f"no tier named {location!r}; tiers: "
                             f"{', '.join(self.storage_manager.tier_names)}")
        return tiers

    def _chunks(self, tokens: Sequence[int]) -> list[tuple[int, Any]]:
        return [(end, key) for _, end, key in self.token_database.process_tokens(list(tokens))]

    def handle(self, msg: dict) -> dict:
        """Run one controller command (``clear``, ``pin``, ``move``, ``health``)."""
        op = msg["op"]
        if op == "health":
            return {"error_code": 0}
        if op == "clear":
            tiers = self._tiers(msg.get("location"))
            if msg.get("tokens"):
                chunks = self._chunks(msg["tokens"])
                n = max((end for end, key in chunks
                         if any([t.remove(key) for t in tiers])), default=0)
                return {"num_tokens": n}
            cleared = sum(int(t.clear() or 0) for t in tiers)
            return {"num_tokens": cleared * self.chunk_size}
        if op == "pin":
            tier = self._tiers(msg.get("location"))[0]
            n = 0
            for end, key in self._chunks(msg["tokens"]):
                if not tier.contains(key, pin=True):
                    break
                n = end
            return {"num_tokens": n}
        if op == "move":
            return {"num_tokens": self._move(msg)}
        raise ValueError(f"unknown command {op!r}")

    def _move(self, msg: dict) -> int:
        dst = self._tiers(msg["dst_location"])[0]
        chunks = self._chunks(msg["tokens"])
        keys = [k for _, k in chunks]
        if msg["src_instance"] == self.instance_id:
            src = self._tiers(msg["src_location"])[0]
        else:
            src = next((t for t in self.storage_manager.backends if t.name == "P2PBackend"), None)
            if src is None:
                raise ValueError("move from another instance needs the p2p tier "
                                 "(storage/backends=[...,p2p])")
        objs = src.batched_get_blocking(keys)
        n = 0
        for (end, key), obj in zip(chunks, objs):
            if obj is None:
                break
            dst.put(key, obj)
            n = end
        for obj in objs:
            if obj is not None:
                obj.ref_count_down()
        if msg.get("remove_source") and src is not dst:
            for _, key in chunks[:sum(o is not None for o in objs)]:
                src.remove(key)
        return n
