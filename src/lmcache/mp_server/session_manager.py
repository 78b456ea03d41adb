"""SessionManager: who is connected to the MP server and what each holds.

Three kinds of session:

- **instance** (an engine worker, keyed by the ``instance_id`` it registers with — vLLM's
  adapter sends its pid): its :class:`GPUCacheContext` (the IPC-mapped KV caches);
- **client** (one ZMQ connection, keyed by its ROUTER identity): the requests it looked up;
- **request** (keyed by vLLM's request id): the engines its lookup pinned and how many tokens
  it counted, released by END_SESSION, FREE_LOOKUP_LOCKS covering them, its retrieve, or the
  death of its client.

Liveness: an instance or client that sent a HEARTBEAT is dead after ``timeout`` seconds of
silence; an instance that never heartbeats (LMCache's older adapter) is dead when its pid no
longer exists on this host (``check_pids``). :meth:`reap` returns what died; the server then
frees it. Not thread-safe by itself: the server calls it from its one loop thread.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from lmcache.mp_server.gpu_cache_context import GPUCacheContext


@dataclass
class InstanceSession:
    ctx: GPUCacheContext
    generation: int
    last_seen: float
    heartbeats: bool = False


@dataclass
class ClientSession:
    last_seen: float
    heartbeats: bool = False
    requests: set = field(default_factory=set)


@dataclass
class RequestSession:
    request_id: str
    client: bytes
    engines: list = field(default_factory=list)
    hit_tokens: int = 0


class SessionManager:
    """Sessions of instances, clients and requests (module docstring).

    Args:
        timeout: seconds without a heartbeat after which a heartbeating session is dead (> 0).
        check_pids: an instance that never heartbeats is dead when its pid is gone.

    Raises:
        ValueError: timeout <= 0.
    """

    def __init__(self, timeout: float = 30.0, check_pids: bool = True) -> None:
        if not timeout > 0:
            raise ValueError(f"session timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.check_pids = bool(check_pids)
        self.instances: dict[int, InstanceSession] = {}
        self.clients: dict[bytes, ClientSession] = {}
        self.requests: dict[str, RequestSession] = {}
        self._generation = 0

    # ---- instances -----------------------------------------------------------------------
    def register(self, instance_id: int, ctx: GPUCacheContext) -> Optional[InstanceSession]:
        """Register (or replace) an instance's KV caches; returns the replaced session."""
        self._generation += 1
        old = self.instances.get(instance_id)
        self.instances[instance_id] = InstanceSession(ctx, self._generation, time.monotonic(),
                                                      heartbeats=bool(old and old.heartbeats))
        return old

    def unregister(self, instance_id: int) -> Optional[InstanceSession]:
        return self.instances.pop(instance_id, None)

    def instance(self, instance_id: int) -> Optional[InstanceSession]:
        return self.instances.get(instance_id)

    # ---- clients and requests -----------------------------------------------------------
    def touch(self, client: bytes, instance_id: Optional[int] = None,
              heartbeat: bool = False) -> None:
        """Note that ``client`` (and ``instance_id``) just talked to the server."""
        now = time.monotonic()
        session = self.clients.setdefault(client, ClientSession(now))
        session.last_seen = now
        session.heartbeats |= heartbeat
        inst = self.instances.get(instance_id) if instance_id is not None else None
        if inst is not None:
            inst.last_seen = now
            inst.heartbeats |= heartbeat

    def note_lookup(self, client: bytes, request_id: str, engines: list, hit_tokens: int) -> None:
        """A lookup of ``request_id`` pinned chunks in ``engines`` (lookup id = request id)."""
        session = self.requests.get(request_id)
        if session is None:
            session = self.requests[request_id] = RequestSession(request_id, client)
        for engine in engines:
            if engine not in session.engines:
                session.engines.append(engine)
        session.hit_tokens = max(session.hit_tokens, hit_tokens)
        self.clients.setdefault(client, ClientSession(time.monotonic())).requests.add(request_id)

    def end_request(self, request_id: str) -> Optional[RequestSession]:
        """Forget ``request_id``; returns its session (the caller releases its pins)."""
        session = self.requests.pop(request_id, None)
        if session is not None and session.client in self.clients:
            self.clients[session.client].requests.discard(request_id)
        return session

    # ---- liveness ------------------------------------------------------------------------
    def reap(self, now: Optional[float] = None) -> tuple[list[int], list[RequestSession]]:
        """Remove the dead: returns (dead instance ids with their sessions removed, request
        sessions of dead clients, removed)."""
        now = time.monotonic() if now is None else now
        dead_instances = [i for i, s in self.instances.items() if self._dead_instance(i, s, now)]
        for i in dead_instances:
            self.instances.pop(i).ctx.close()
        dead_requests: list[RequestSession] = []
        for client, session in list(self.clients.items()):
            if session.heartbeats and now - session.last_seen > self.timeout:
                del self.clients[client]
                for rid in session.requests:
                    req = self.requests.pop(rid, None)
                    if req is not None:
                        dead_requests.append(req)
        return dead_instances, dead_requests

    def _dead_instance(self, instance_id: int, session: InstanceSession, now: float) -> bool:
        if session.heartbeats:
            return now - session.last_seen > self.timeout
        if not self.check_pids or instance_id <= 0:
            return False
        try:
            os.kill(instance_id, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
