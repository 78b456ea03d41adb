"""CudaIpcChannel: the transfer channel between GPU processes of one host, over CUDA IPC.

The same API as NixlChannel, for CUDA regions: ``agent_metadata()`` carries a CUDA IPC handle
of each region (``torch.UntypedStorage._share_cuda_()`` fields, msgpack, never pickle) and the
address of this agent's ZMQ PULL socket; ``add_peer`` opens the peer's regions in this process,
so ``write``/``read`` are device-to-device copies (``copy_`` on a private stream, waited for with
a deadline). Notifications travel over ZMQ PUSH/PULL after the copy has finished. A peer's death
is seen through its pid (same host): TransferError, never a silent write into orphaned memory.
Used where NIXL's wheel cannot be installed (the device machine); ``transfer_channel=cuda_ipc``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional, Sequence

import msgpack
import torch
import zmq

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _merged(local: list, remote: list) -> list:
    """Pairs of (region, offset, length) descs, neighbours that continue each other on both
    sides merged into one copy (a batch of adjacent chunks is one device copy)."""
    out: list = []
    for (li, lo, n), (ri, ro, _) in zip(local, remote):
        if out:
            (pli, plo, pn), (pri, pro, _) = out[-1]
            if li == pli and ri == pri and lo == plo + pn and ro == pro + pn:
                out[-1] = ((pli, plo, pn + n), (pri, pro, pn + n))
                continue
        out.append(((li, lo, n), (ri, ro, n)))
    return out


class CudaIpcChannel(TransferChannel):
    """CUDA regions shared with peers of the same host through CUDA IPC handles.

    Args:
        agent_name: unique name among peers; regions: contiguous CUDA tensors;
        timeout_s: default deadline (s); notify_host: interface of the notification socket;
        poll_interval_s: sleep between polls of a copy's completion event.
    Raises: ValueError for non-CUDA regions; RuntimeError when CUDA is absent.
    """

    kind = "cuda_ipc"

    def __init__(self, agent_name: str, regions: Sequence[torch.Tensor], timeout_s: float = 5.0,
                 notify_host: str = "127.0.0.1", poll_interval_s: float = 0.0001):
        super().__init__(agent_name, regions, timeout_s)
        if any(r.mem_type != "VRAM" for r in self._region_infos):
            raise ValueError("CudaIpcChannel registers CUDA tensors only")
        self.poll_interval_s = float(poll_interval_s)
        self._handles = []
        for t in self._regions:
            st = t.untyped_storage()
            self._handles.append([list(st._share_cuda_()), t.data_ptr() - st.data_ptr()])
        self._ctx = zmq.Context.instance()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        port = self._pull.bind_to_random_port(f"tcp://{notify_host}")
        self._address = f"tcp://{notify_host}:{port}"
        self._peers: dict[str, dict] = {}  # name -> {"tensors", "push", "pid"}
        self._stream = torch.cuda.Stream(device=self._regions[0].device)

    def agent_metadata(self) -> bytes:
        return pack_metadata(self._name, self.kind, self._region_infos, ipc=self._handles,
                             notify=self._address, pid=os.getpid())

    def add_peer(self, metadata: bytes) -> str:
        md = unpack_metadata(metadata, self.kind)
        name, ipc = md["name"], md.get("ipc")
        if name == self._name:
            raise ValueError(f"peer name {name!r} is this agent's own name")
        if not isinstance(ipc, list) or len(ipc) != len(md["regions"]):
            raise ValueError("peer metadata has no CUDA IPC handle per region")
        if not isinstance(md.get("notify"), str) or not isinstance(md.get("pid"), int):
            raise ValueError("peer metadata has no notification address or pid")
        tensors = []
        try:
            for (fields, offset), r in zip(ipc, md["regions"]):
                st = torch.UntypedStorage._new_shared_cuda(*fields)
                flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{fields[0]}")
                flat.set_(st, 0, (st.nbytes(),))
                tensors.append(flat[offset:offset + r.length])
        except Exception as e:
            raise TransferError(f"could not open peer {name!r}'s CUDA IPC handles: {e}") from e
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, int(self.timeout_s * 1000))
        push.connect(md["notify"])
        with self._lock:
            self.remove_peer(name)
            self._peers[name] = {"tensors": tensors, "push": push, "pid": md["pid"]}
            self._peer_regions[name] = md["regions"]
        return name

    def remove_peer(self, name: str) -> None:
        with self._lock:
            p = self._peers.pop(name, None)
            self._peer_regions.pop(name, None)
        if p is not None:
            p["push"].close(0)

    def _alive(self, peer: str, op: str) -> dict:
        p = self._peers.get(peer)
        if p is None or not _pid_alive(p["pid"]):
            raise TransferError(f"cuda_ipc {op}: peer {peer!r} (pid {p and p['pid']}) is gone")
        return p

    def _copy(self, op: str, peer: str, local_descs, remote_descs, timeout_s) -> None:
        timeout = self._deadline(timeout_s)
        regions = self._peer(peer, op)
        p = self._alive(peer, op)
        local = resolve_descs(local_descs, self._region_infos, "local")
        remote = resolve_descs(remote_descs, regions, "remote")
        check_pairs(local, remote)
        pairs = _merged([d if len(d) == 3 else (0, *d) for d in local_descs],
                        [d if len(d) == 3 else (0, *d) for d in remote_descs])
        deadline = time.monotonic() + timeout
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        with torch.cuda.stream(self._stream):
            for (li, lo, n), (ri, ro, _) in pairs:
                a = self._regions[li][lo:lo + n]
                b = p["tensors"][ri][ro:ro + n]
                (b if op == "write" else a).copy_(a if op == "write" else b, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        while not done.query():
            if time.monotonic() > deadline:
                raise TransferError(f"cuda_ipc {op} to peer {peer!r} did not finish within {timeout:g} s")
            time.sleep(self.poll_interval_s)
        self._alive(peer, op)

    def read(self, peer: str, local_descs: Sequence[Desc], remote_descs: Sequence[Desc],
             timeout_s: Optional[float] = None) -> None:
        self._copy("read", peer, local_descs, remote_descs, timeout_s)

    def write(self, peer: str, local_descs: Sequence[Desc], remote_descs: Sequence[Desc],
              notify: Optional[bytes] = None, timeout_s: Optional[float] = None) -> None:
        if notify is not None and not isinstance(notify, bytes):
            raise ValueError(f"notify must be bytes or None, got {type(notify).__name__}")
        self._copy("write", peer, local_descs, remote_descs, timeout_s)
        if notify is not None:
            self.send_notification(peer, notify)

    def send_notification(self, peer: str, msg: bytes) -> None:
        if not isinstance(msg, bytes):
            raise ValueError(f"msg must be bytes, got {type(msg).__name__}")
        self._peer(peer, "send_notification")
        p = self._alive(peer, "send_notification")
        try:
            with self._lock:
                p["push"].send(msgpack.packb([self._name, msg], use_bin_type=True))
        except zmq.ZMQError as e:
            raise TransferError(f"cuda_ipc notification to peer {peer!r} failed: {e}") from e

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        out = []
        if self._closed:
            return out
        while True:
            try:
                raw = self._pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                sender, msg = msgpack.unpackb(raw, raw=False, max_bin_len=1 << 20)
                out.append((str(sender), bytes(msg)))
            except Exception:
                logger.warning("cuda_ipc: dropped a malformed notification (%d bytes)", len(raw))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for name in list(self._peers):
                self.remove_peer(name)
            self._pull.close(0)
