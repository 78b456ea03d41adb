"""ValkeyChunkIndex: the controller's chunk index in a Valkey (or Redis) server.

A restarted controller finds the index and the registered workers where it left them, and
several controllers may serve one fleet through the same server (each applies the events it
receives; heartbeats and the dropping of silent workers are idempotent).

Layout (``prefix`` default ``lmcache:controller:``; ``W`` = ``instance_id \\x1f worker_id``):

* ``<prefix>workers`` HASH ``W`` → msgpack of the WorkerInfo;
  ``<prefix>heartbeats`` HASH ``W`` → last heartbeat (seconds since the epoch, as text);
* ``<prefix>chunk:<hash>`` SET of ``W \\x1e location``; ``<prefix>held:<W>`` SET of
  ``<hash> \\x1e location`` (the reverse entries, so dropping a worker costs its own entries).

Each batch of events is one pipelined round trip; ``holders`` of n hashes is one round trip of n
SMEMBERS; ``held_prefixes`` (the controller's lookups) is one round trip running a Lua script
on the server (:data:`HELD_PREFIXES_LUA`: the n SMEMBERS happen there and only a count per
worker comes back; a server that refuses scripts gets the pipelined SMEMBERS). A server that cannot be reached raises ``valkey.exceptions.ConnectionError`` to the
controller, which logs it and answers "no holder" / an error (it never crashes).
"""

from __future__ import annotations

import time
import hashlib
import logging
from collections.abc import Collection, Iterable, Sequence

import msgpack
import valkey

from lmcache.controller.chunk_index import ChunkIndex, Holder, WorkerInfo
from lmcache.controller.protocol import ADMIT, EVICT, split_worker_key, worker_key

_SEP = "\x1e"
logger = logging.getLogger(__name__)

HELD_PREFIXES_LUA = r"""
-- KEYS: the chunk sets of the hashes, in order; ARGV: the locations that count (none: any).
-- Returns {worker, leading chunks held, ...} for each worker holding the first chunk.
local any, ok = #ARGV == 0, {}
for _, loc in ipairs(ARGV) do ok[loc] = true end
local alive, counts, who = nil, {}, {}  -- who: member -> its worker (false: not counted)
for i, key in ipairs(KEYS) do
  local here = {}
  for _, m in ipairs(redis.call('SMEMBERS', key)) do
    local w = who[m]
    if w == nil then  -- each distinct member is split once (the same few recur in every chunk)
      local cut = string.find(m, '\30[^\30]*$')
      w = cut ~= nil and (any or ok[string.sub(m, cut + 1)] == true) and string.sub(m, 1, cut - 1)
      who[m] = w
    end
    if w then here[w] = true end
  end
  if alive == nil then alive = here
  else for w in pairs(alive) do if not here[w] then alive[w] = nil end end end
  local empty = true
  for w in pairs(alive) do counts[w] = i; empty = false end
  if empty then break end
end
local out = {}
for w, n in pairs(counts) do out[#out + 1] = w; out[#out + 1] = n end
return out
"""


class ValkeyChunkIndex(ChunkIndex):
    """Args:
        url: ``valkey://host:port[/db]`` or ``redis://...`` (valkey-py's URL forms).
        prefix: key prefix of this fleet (two fleets on one server use two prefixes).
        socket_timeout_secs: deadline of one server call, > 0.

    Raises:
        ValueError: a URL valkey-py cannot parse, or a bad timeout.
    """

    def __init__(self, url: str = "valkey://localhost:6379", prefix: str = "lmcache:controller:",
                 socket_timeout_secs: float = 2.0) -> None:
        if not isinstance(socket_timeout_secs, (int, float)) or not socket_timeout_secs > 0:
            raise ValueError(f"socket_timeout_secs must be > 0, got {socket_timeout_secs!r}")
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(f"url must be valkey://host:port, got {url!r}")
        self.prefix = prefix
        self._client = valkey.Valkey.from_url(
            url.replace("valkey://", "redis://", 1) if url.startswith("valkey://") else url,
            socket_timeout=socket_timeout_secs, socket_connect_timeout=socket_timeout_secs)
        self._script_sha = hashlib.sha1(HELD_PREFIXES_LUA.encode()).hexdigest()
        self._scripts = True  # False once the server refused to run the script

    # ---- keys -------------------------------------------------------------------------
    def _k(self, name: str) -> str:
        return self.prefix + name

    def _chunk(self, h: int) -> str:
        return f"{self.prefix}chunk:{int(h)}"

    def _held(self, w: str) -> str:
        return f"{self.prefix}held:{w}"

    # ---- workers ----------------------------------------------------------------------
    def register(self, info: WorkerInfo) -> None:
        w = worker_key(info.instance_id, info.worker_id)
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(self._k("workers"), w, msgpack.packb(info.to_dict(), use_bin_type=True))
        pipe.hset(self._k("heartbeats"), w, repr(info.last_heartbeat_time or time.time()))
        pipe.execute()

    def heartbeat(self, instance_id: str, worker_id: int, now: float) -> bool:
        w = worker_key(instance_id, worker_id)
        if not self._client.hexists(self._k("workers"), w):
            return False
        self._client.hset(self._k("heartbeats"), w, repr(float(now)))
        return True

    def workers(self) -> list[WorkerInfo]:
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(self._k("workers"))
        pipe.hgetall(self._k("heartbeats"))
        infos, beats = pipe.execute()
        out = []
        for w, raw in infos.items():
            try:
                info = WorkerInfo.from_dict(msgpack.unpackb(raw, raw=False))
            except Exception:  # noqa: BLE001 - a corrupt entry is skipped
                continue
            beat = beats.get(w)
            if beat is not None:
                info.last_heartbeat_time = float(beat)
            out.append(info)
        return out

    def remove_worker(self, instance_id: str, worker_id: int) -> int:
        w = worker_key(instance_id, worker_id)
        members = self._client.smembers(self._held(w))
        pipe = self._client.pipeline(transaction=False)
        for m in members:
            h, _, loc = m.decode().partition(_SEP)
            pipe.srem(self._chunk(int(h)), f"{w}{_SEP}{loc}")
        pipe.delete(self._held(w))
        pipe.hdel(self._k("workers"), w)
        pipe.hdel(self._k("heartbeats"), w)
        pipe.execute()
        return len(members)

    # ---- chunks -----------------------------------------------------------------------
    def apply(self, instance_id: str, worker_id: int, location: str,
              ops: Sequence[tuple[int, int]]) -> None:
        w = worker_key(instance_id, worker_id)
        member = f"{w}{_SEP}{location}"
        pipe = self._client.pipeline(transaction=False)
        for op, h in ops:
            if op == ADMIT:
                pipe.sadd(self._chunk(h), member)
                pipe.sadd(self._held(w), f"{int(h)}{_SEP}{location}")
            elif op == EVICT:
                pipe.srem(self._chunk(h), member)
                pipe.srem(self._held(w), f"{int(h)}{_SEP}{location}")
        pipe.execute()

    def replace(self, instance_id: str, worker_id: int, location: str,
                hashes: Iterable[int]) -> None:
        new = {int(h) for h in hashes}
        old = self.chunks_of(instance_id, worker_id, location)
        ops = [(EVICT, h) for h in old - new] + [(ADMIT, h) for h in new - old]
        for i in range(0, len(ops), 10000):
            self.apply(instance_id, worker_id, location, ops[i:i + 10000])

    def holders(self, hashes: Sequence[int]) -> list[list[Holder]]:
        pipe = self._client.pipeline(transaction=False)
        for h in hashes:
            pipe.smembers(self._chunk(h))
        out = []
        for members in pipe.execute():
            row = []
            for m in members:
                w, _, loc = m.decode().rpartition(_SEP)
                instance_id, worker_id = split_worker_key(w)
                row.append((instance_id, worker_id, loc))
            out.append(row)
        return out

    def held_prefixes(self, hashes: Sequence[int],
                      locations: Collection[str] | None = None) -> dict[tuple[str, int], int]:
        if not self._scripts:
            return super().held_prefixes(hashes, locations)
        keys, args = [self._chunk(h) for h in hashes], sorted(locations or ())
        try:
            for attempt in range(2):  # (the script loaded after a NOSCRIPT reply, once)
                pipe = self._client.pipeline(transaction=False)
                pipe.hkeys(self._k("workers"))
                if keys:  # one round trip: EVALSHA, not a Script object's SCRIPT EXISTS first
                    pipe.evalsha(self._script_sha, len(keys), *keys, *args)
                replies = pipe.execute(raise_on_error=False)
                if not (keys and isinstance(replies[1], valkey.exceptions.NoScriptError)):
                    break
                self._client.script_load(HELD_PREFIXES_LUA)
            for r in replies:
                if isinstance(r, Exception):
                    raise r
        except valkey.exceptions.ResponseError as e:  # scripting refused (e.g. a managed server)
            logger.warning("Valkey index: held_prefixes without a server script (%s)", e)
            self._scripts = False
            return super().held_prefixes(hashes, locations)
        if locations is not None and not locations:
            return {split_worker_key(w.decode()): 0 for w in replies[0]}
        out = {split_worker_key(w.decode()): 0 for w in replies[0]}
        flat = replies[1] if hashes else []
        for w, n in zip(flat[::2], flat[1::2]):
            who = split_worker_key(w.decode())
            if who in out:
                out[who] = int(n)
        return out

    def num_entries(self) -> int:
        pipe = self._client.pipeline(transaction=False)
        ws = list(self._client.hkeys(self._k("workers")))
        for w in ws:
            pipe.scard(self._held(w.decode()))
        return sum(pipe.execute()) if ws else 0

    def chunks_of(self, instance_id: str, worker_id: int,
                  location: str | None = None) -> set[int]:
        out = set()
        for m in self._client.smembers(self._held(worker_key(instance_id, worker_id))):
            h, _, loc = m.decode().partition(_SEP)
            if location is None or loc == location:
                out.add(int(h))
        return out

    def close(self) -> None:
        self._client.close()
