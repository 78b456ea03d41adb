"""InstanceOperations: the controller operations that act on an instance (LMCache's
controller API): :meth:`~InstanceOperations.clear`, :meth:`~InstanceOperations.pin`,
:meth:`~InstanceOperations.move`, :meth:`~InstanceOperations.health`,
:meth:`~InstanceOperations.query_worker_info`, :meth:`~InstanceOperations.query_instance`.

Each command goes to every worker of the instance, to the command port it registered
(ZMQ REQ/REP, :mod:`lmcache.controller.protocol` messages, ``command_timeout_secs`` each), all
workers at once. A mixin of :class:`lmcache.controller.cache_controller.CacheController`, which
provides ``index`` (the chunk index), ``_ctx`` (its ZMQ context), ``_pool`` (a thread pool)
and ``command_timeout_secs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import zmq

from lmcache.controller.chunk_index import WorkerInfo
from lmcache.controller.protocol import ProtocolError, decode, encode


class InstanceOperations:
    """Operations on instances, sent to their workers (see the module docstring).

    Raises (each operation):
        KeyError: no registered worker of the instance.
        RuntimeError: a worker failed or did not answer within ``command_timeout_secs``
            (the message names it).
    """

    index: Any
    command_timeout_secs: float
    _ctx: zmq.Context
    _pool: Any

    def _workers_of(self, instance_id: str, worker_ids: Optional[Sequence[int]] = None
                    ) -> list[WorkerInfo]:
        ws = [w for w in self.index.workers() if w.instance_id == instance_id
              and (worker_ids is None or w.worker_id in worker_ids)]
        if not ws:
            raise KeyError(f"no registered worker of instance {instance_id!r}")
        return sorted(ws, key=lambda w: w.worker_id)

    def send_command(self, worker: WorkerInfo, msg: dict[str, Any]) -> dict[str, Any]:
        """One command to one worker (REQ/REP); ``{"error": ...}`` on timeout or failure."""
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(self.command_timeout_secs * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(self.command_timeout_secs * 1000))
        try:
            sock.connect(f"tcp://{worker.ip}:{worker.port}")
            sock.send(encode(msg))
            return decode(sock.recv(), reply=True)
        except (zmq.ZMQError, ProtocolError) as e:
            return {"error": f"worker {worker.instance_id}/{worker.worker_id} at "
                             f"{worker.ip}:{worker.port}: {type(e).__name__}: {e}"}
        finally:
            sock.close()

    def _broadcast(self, workers: list[WorkerInfo], msg: dict[str, Any]) -> list[dict[str, Any]]:
        return list(self._pool.map(lambda w: self.send_command(w, msg), workers))

    @staticmethod
    def _sum_tokens(replies: list[dict[str, Any]], what: str) -> int:
        errors = [r["error"] for r in replies if "error" in r]
        if errors:
            raise RuntimeError(f"{what} failed: {'; '.join(errors)}")
        return max((int(r.get("num_tokens", 0)) for r in replies), default=0)

    def clear(self, instance_id: str, location: str) -> int:
        """Clear the tier ``location`` (a tier name, or ``"all"``) on every worker of the
        instance; returns the tokens cleared (largest over the workers)."""
        return self._sum_tokens(self._broadcast(self._workers_of(instance_id),
                                                {"op": "clear", "location": location}), "clear")

    def pin(self, instance_id: str, location: str, tokens: Sequence[int]) -> int:
        """Pin the cached prefix of ``tokens`` in ``location`` on the instance's workers;
        returns the tokens pinned."""
        return self._sum_tokens(self._broadcast(self._workers_of(instance_id), {
            "op": "pin", "location": location, "tokens": list(tokens)}), "pin")

    def move(self, old_position: Sequence[str], new_position: Sequence[str],
             tokens: Sequence[int], copy: bool = False) -> int:
        """Copy the cached prefix of ``tokens`` from ``(instance, location)`` to ``(instance,
        location)`` (the destination's workers pull it over P2P when the instances differ),
        then, unless ``copy``, remove it from the source. Returns the tokens moved."""
        (src_inst, src_loc), (dst_inst, dst_loc) = old_position, new_position
        src = self._workers_of(src_inst)
        dsts = self._workers_of(dst_inst)
        moved = self._sum_tokens(self._broadcast(dsts, {
            "op": "move", "tokens": list(tokens), "src_instance": src_inst,
            "src_location": src_loc, "dst_location": dst_loc,
            "remove_source": not copy and src_inst == dst_inst}), "move")
        if not copy and src_inst != dst_inst and moved:
            self._sum_tokens(self._broadcast(src, {"op": "clear", "location": src_loc,
                                                   "tokens": list(tokens)[:moved]}), "move")
        return moved

    def health(self, instance_id: str) -> dict[int, int]:
        """``{worker_id: error_code}`` (0 = healthy; 1 = did not answer)."""
        workers = self._workers_of(instance_id)
        replies = self._broadcast(workers, {"op": "health"})
        return {w.worker_id: (1 if "error" in r else int(r.get("error_code", 0)))
                for w, r in zip(workers, replies)}

    def query_worker_info(self, instance_id: str,
                          worker_ids: Optional[Sequence[int]] = None) -> list[WorkerInfo]:
        return self._workers_of(instance_id, worker_ids)

    def query_instance(self, ip: str) -> Optional[str]:
        """The instance id of a worker at ``ip`` (None: none)."""
        return next((w.instance_id for w in self.index.workers() if w.ip == ip), None)
