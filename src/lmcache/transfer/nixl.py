"""NixlChannel: the transfer channel over NVIDIA NIXL (pip ``nixl-cu12``; UCX backend).

NIXL's UCX backend moves host (DRAM) or GPU (VRAM) memory between processes one-sidedly: a
``write`` puts local bytes into a peer's registered region and, when they have landed, delivers
the optional ``notify`` message to the peer's ``poll_notifications()``; a ``read`` gets them.
Agent metadata (NIXL's own blob + this channel's region table) is exchanged out of band, e.g.
over ZMQ. Every call returns or raises TransferError within its deadline (a dead peer shows as
a NIXL error or as the deadline).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional, Sequence

import torch

from lmcache.transfer.base import (
    Desc,
    TransferChannel,
    TransferError,
    check_pairs,
    pack_metadata,
    resolve_descs,
    unpack_metadata,
)

logger = logging.getLogger(__name__)

_INSTALL_HINT = "NIXL is not installed: pip install nixl-cu12 (or lmcache[nixl])"


def _nixl_api():
    """(nixl_agent, nixl_agent_config, nixl_thread_sync_t) from ``nixl`` or ``nixl_cu12``."""
    try:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
    except ImportError:
        try:
            from nixl_cu12 import nixl_agent, nixl_agent_config, nixl_thread_sync_t
        except ImportError as e:
            raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return nixl_agent, nixl_agent_config, nixl_thread_sync_t


class NixlChannel(TransferChannel):
    """A NIXL agent with ``regions`` registered.

    Args:
        agent_name: unique name of this agent among its peers (str).
        regions: contiguous tensors to register (CPU = DRAM, CUDA = VRAM), normally the CPU
            allocator's buffer ``CPUMemoryAllocator.buffer``; descs index into them.
        backend: NIXL backend plugin, "UCX" by default.
        timeout_s: default deadline of read/write/send_notification, seconds (> 0).
        poll_interval_s: sleep between polls of a transfer's state, seconds.
        progress_interval_s: how often a background thread progresses the agent (notifications,
            passive-side steps), seconds; 0 = NIXL's own progress thread, which spins a core.
    Raises:
        ImportError (with the install hint) when NIXL is missing; ValueError on bad regions;
        TransferError when the backend cannot start or register the memory.
    """

    kind = "nixl"

    def __init__(self, agent_name: str, regions: Sequence[torch.Tensor], backend: str = "UCX",
                 timeout_s: float = 5.0, poll_interval_s: float = 0.0002,
                 progress_interval_s: float = 0.005):
        super().__init__(agent_name, regions, timeout_s)
        nixl_agent, nixl_agent_config, sync_t = _nixl_api()
        self.backend = backend
        self.poll_interval_s = float(poll_interval_s)
        self.progress_interval_s = float(progress_interval_s)
        # NIXL's own progress thread polls without pause (a whole core, measured idle); instead
        # transfers progress while their caller polls them, and a light thread of ours
        # progresses the agent every progress_interval_s for what arrives unasked
        # (notifications, passive-side protocol steps). 0: NIXL's thread.
        conf = nixl_agent_config(
            enable_prog_thread=self.progress_interval_s <= 0, backends=[backend],
            sync_mode=sync_t.NIXL_THREAD_SYNC_STRICT,  # calls from several threads are safe
        )
        self._notifs: list[tuple[str, bytes]] = []
        self._notif_lock = threading.Lock()
        self._stop = threading.Event()
        try:
            self._agent = nixl_agent(agent_name, conf)
        except Exception as e:
            raise TransferError(f"NIXL agent {agent_name!r} did not start: {e}") from e
        if backend not in self._agent.backends:
            raise TransferError(
                f"NIXL backend {backend!r} is not available (plugins: {self._agent.get_plugin_list()})"
            )
        self._reg = []
        try:
            for r in self._region_infos:
                self._reg.append(self._agent.register_memory(
                    [(r.address, r.length, r.device_id, "")], r.mem_type, backends=[backend]))
        except Exception as e:
            self.close()
            raise TransferError(f"NIXL agent {agent_name!r} could not register its memory: {e}") from e
        self._progress = None
        if self.progress_interval_s > 0:
            self._progress = threading.Thread(target=self._progress_loop, daemon=True,
                                              name=f"nixl-progress-{agent_name}")
            self._progress.start()

    def _progress_loop(self) -> None:
        while not self._stop.wait(self.progress_interval_s):
            try:
                self._collect()
            except Exception as e:  # the agent is closing
                logger.debug("NIXL progress: %s", e)

    def _collect(self) -> None:
        got = self._agent.get_new_notifs()
        if got:
            with self._notif_lock:
                self._notifs.extend((str(p), bytes(m)) for p, msgs in got.items() for m in msgs)

    # ---- peers ----------------------------------------------------------------------
    def agent_metadata(self) -> bytes:
        """msgpack map: name, NIXL agent metadata, region table."""
        return pack_metadata(self._name, self.kind, self._region_infos,
                             nixl=self._agent.get_agent_metadata())

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's ``agent_metadata()``; returns its name (replaces an older entry)."""
        md = unpack_metadata(metadata, self.kind)
        if not isinstance(md.get("nixl"), bytes):
            raise ValueError("peer metadata has no NIXL agent metadata")
        name = md["name"]
        if name == self._name:
            raise ValueError(f"peer name {name!r} is this agent's own name")
        with self._lock:
            if name in self._peer_regions:
                self._forget(name)
            try:
                loaded = self._agent.add_remote_agent(md["nixl"])
            except Exception as e:
                raise TransferError(f"NIXL could not load peer {name!r}'s metadata: {e}") from e
            loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
            if loaded != name:
                self._agent.remove_remote_agent(loaded)
                raise ValueError(f"peer metadata names {name!r} but its NIXL blob names {loaded!r}")
            self._peer_regions[name] = md["regions"]
        return name

    def remove_peer(self, name: str) -> None:
        with self._lock:
            if name in self._peer_regions:
                self._forget(name)

    def _forget(self, name: str) -> None:
        del self._peer_regions[name]
        try:
            self._agent.remove_remote_agent(name)
        except Exception as e:  # already gone on NIXL's side
            logger.debug("NIXL remove_remote_agent(%s): %s", name, e)

    # ---- data -----------------------------------------------------------------------
    def read(self, peer: str, local_descs: Sequence[Desc], remote_descs: Sequence[Desc],
             timeout_s: Optional[float] = None) -> None:
        """Copy the peer's remote_descs into local_descs (pairwise, equal lengths)."""
        self._transfer("READ", peer, local_descs, remote_descs, b"", timeout_s)

    def write(self, peer: str, local_descs: Sequence[Desc], remote_descs: Sequence[Desc],
              notify: Optional[bytes] = None, timeout_s: Optional[float] = None) -> None:
        """Copy local_descs into the peer's remote_descs; then the peer sees ``notify``."""
        if notify is not None and not isinstance(notify, bytes):
            raise ValueError(f"notify must be bytes or None, got {type(notify).__name__}")
        self._transfer("WRITE", peer, local_descs, remote_descs, notify or b"", timeout_s)

    def _transfer(self, op: str, peer: str, local_descs, remote_descs, notif: bytes,
                  timeout_s: Optional[float]) -> None:
        timeout = self._deadline(timeout_s)
        peer_regions = self._peer(peer, op.lower())
        local = resolve_descs(local_descs, self._region_infos, "local")
        remote = resolve_descs(remote_descs, peer_regions, "remote")
        check_pairs(local, remote)
        deadline = time.monotonic() + timeout
        a = self._agent
        try:
            handle = a.initialize_xfer(
                op,
                a.get_xfer_descs([d[:3] for d in local], local[0][3]),
                a.get_xfer_descs([d[:3] for d in remote], remote[0][3]),
                peer, notif, backends=[self.backend],
            )
            state = a.transfer(handle)
        except Exception as e:
            raise TransferError(f"NIXL {op} to peer {peer!r} failed to start: {e}") from e
        try:
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferError(
                        f"NIXL {op} of {sum(d[1] for d in local)} bytes to peer {peer!r} "
                        f"did not finish within {timeout:g} s (peer gone or stalled)"
                    )
                if self.poll_interval_s > 0:
                    time.sleep(self.poll_interval_s)
                state = a.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"NIXL {op} to peer {peer!r} failed (state {state})")
        except TransferError:
            self._release(handle)
            raise
        except Exception as e:
            self._release(handle)
            raise TransferError(f"NIXL {op} to peer {peer!r} failed: {e}") from e
        self._release(handle)

    def _release(self, handle) -> None:
        try:
            handle.release()
        except Exception as e:  # an active transfer that cannot be cancelled: NIXL keeps it
            logger.warning("NIXL could not release a transfer handle at once: %s", e)

    # ---- notifications --------------------------------------------------------------
    def send_notification(self, peer: str, msg: bytes) -> None:
        """Deliver ``msg`` to the peer's poll_notifications() (no data)."""
        if not isinstance(msg, bytes):
            raise ValueError(f"msg must be bytes, got {type(msg).__name__}")
        self._peer(peer, "send_notification")
        try:
            self._agent.send_notif(peer, msg)  # (its backend= argument is broken in 1.5.1)
        except Exception as e:
            raise TransferError(f"NIXL notification to peer {peer!r} failed: {e}") from e

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """(sender, message) pairs that arrived since the last call; never blocks."""
        if self._closed:
            return []
        self._collect()
        with self._notif_lock:
            out, self._notifs = self._notifs, []
        return out

    def close(self) -> None:
        """Drop peers, deregister memory; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            if getattr(self, "_progress", None) is not None:
                self._progress.join(5)
            agent = getattr(self, "_agent", None)
            if agent is None:
                return
            for name in list(self._peer_regions):
                self._forget(name)
            for reg in getattr(self, "_reg", []):
                try:
                    agent.deregister_memory(reg, backends=[self.backend])
                except Exception as e:
                    logger.debug("NIXL deregister_memory: %s", e)
            self._reg = []
