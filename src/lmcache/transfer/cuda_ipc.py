"""CudaIpcChannel: the transfer channel between GPU processes of one host, over CUDA IPC.

The same API as NixlChannel, for CUDA regions: ``agent_metadata()`` carries a CUDA IPC handle
of each region (``torch.UntypedStorage._share_cuda_()`` fields, msgpack, never pickle) and the
address of this agent's ZMQ PULL socket; ``add_peer`` opens the peer's regions in this process,
so ``write``/``read`` are device-to-device copies (``copy_`` on a private stream, waited for with
a deadline). Notifications travel over ZMQ PUSH/PULL after the copy has finished. A peer's death
is seen through its pid (same host): TransferError, never a silent write into orphaned memory.
Used where NIXL's wheel cannot be installed (the device machine); ``transfer_channel=cuda_ipc``.

The per-call path is lean (a 2 GiB copy lasts ~1 ms): descs are checked and merged in one pass
(:func:`plan_copies`; a bad desc falls back to the shared checks for their exact error), the
planned tensor views of recent desc lists are reused, the peer's pid is checked once before
the copy is queued and once after it finished, and the copy's completion event is spun on
(``spin_s``) before it is polled with sleeps until the deadline.
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
    RegionInfo,
    TransferChannel,
    TransferError,
    check_pairs,
    pack_metadata,
    resolve_descs,
    unpack_metadata,
)

logger = logging.getLogger(__name__)

_PLAN_CACHE_SIZE = 64


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


class _BadDesc(Exception):
    pass


def plan_copies(local_descs: Sequence[Desc], remote_descs: Sequence[Desc],
                local_lengths: Sequence[int], remote_lengths: Sequence[int]) -> list:
    """Check descs and pair them into copies in one pass: a list of ``((li, lo, n), (ri, ro,
    n))`` (region index, byte offset, byte length), adjacent pairs merged (see :func:`_merged`).

    ``*_lengths`` are the byte lengths of the regions on each side. Raises ValueError for a
    bad desc with the message of :func:`~lmcache.transfer.base.resolve_descs` /
    :func:`~lmcache.transfer.base.check_pairs` (the slow checks run only then).
    """
    out: list = []
    try:
        if len(local_descs) != len(remote_descs) or not local_descs:
            raise _BadDesc
        pli = plo = pri = pro = pn = -1
        for ld, rd in zip(local_descs, remote_descs):
            if len(ld) == 2:
                li = 0
                lo, n = ld
            else:
                li, lo, n = ld
            if len(rd) == 2:
                ri = 0
                ro, rn = rd
            else:
                ri, ro, rn = rd
            if (type(li) is not int or type(lo) is not int or type(n) is not int
                    or type(ri) is not int or type(ro) is not int or type(rn) is not int
                    or not isinstance(ld, (tuple, list)) or not isinstance(rd, (tuple, list))
                    or n != rn or n <= 0 or lo < 0 or ro < 0 or li < 0 or ri < 0
                    or lo + n > local_lengths[li] or ro + n > remote_lengths[ri]):
                raise _BadDesc
            if li == pli and ri == pri and lo == plo + pn and ro == pro + pn:
                pn += n
                out[-1] = ((li, plo, pn), (ri, pro, pn))
            else:
                pli, plo, pri, pro, pn = li, lo, ri, ro, n
                out.append(((li, lo, n), (ri, ro, n)))
    except (_BadDesc, TypeError, ValueError, IndexError):
        # the slow shared checks name the bad desc (region addresses do not matter here)
        check_pairs(resolve_descs(local_descs, _regions(local_lengths), "local"),
                    resolve_descs(remote_descs, _regions(remote_lengths), "remote"))
        raise ValueError(f"bad descs: local {local_descs!r:.200}, "
                         f"remote {remote_descs!r:.200}") from None
    return out


def _regions(lengths: Sequence[int]) -> list[RegionInfo]:
    return [RegionInfo(0, n, 0, "VRAM") for n in lengths]


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as a 1-D uint8 view of its bytes (descs are byte offsets)."""
    return t.reshape(-1).view(torch.uint8)


class CudaIpcChannel(TransferChannel):
    """CUDA regions shared with peers of the same host through CUDA IPC handles.

    Args:
        agent_name: unique name among peers; regions: contiguous CUDA tensors;
        timeout_s: default deadline (s); notify_host: interface of the notification socket;
        poll_interval_s: sleep between polls of a copy's completion event once ``spin_s``
            has passed; spin_s: how long a call first polls the event without sleeping (a
            sleep's wake-up costs ~0.1 ms, a tenth of a 2 GiB copy).
    Raises: ValueError for non-CUDA regions or bad intervals; RuntimeError when CUDA is absent.
    """

    kind = "cuda_ipc"

    def __init__(self, agent_name: str, regions: Sequence[torch.Tensor], timeout_s: float = 5.0,
                 notify_host: str = "127.0.0.1", poll_interval_s: float = 0.0001,
                 spin_s: float = 0.02):
        super().__init__(agent_name, regions, timeout_s)
        if any(r.mem_type != "VRAM" for r in self._region_infos):
            raise ValueError("CudaIpcChannel registers CUDA tensors only")
        if not poll_interval_s > 0 or not spin_s >= 0:
            raise ValueError(f"poll_interval_s must be > 0 and spin_s >= 0 seconds, got "
                             f"{poll_interval_s!r} and {spin_s!r}")
        self.poll_interval_s = float(poll_interval_s)
        self.spin_s = float(spin_s)
        self._flat = [_flat_bytes(t) for t in self._regions]
        self._lengths = [r.length for r in self._region_infos]
        self._handles = []
        for t in self._regions:
            st = t.untyped_storage()
            self._handles.append([list(st._share_cuda_()), t.data_ptr() - st.data_ptr()])
        self._ctx = zmq.Context.instance()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        port = self._pull.bind_to_random_port(f"tcp://{notify_host}")
        self._address = f"tcp://{notify_host}:{port}"
        # name -> {"tensors", "lengths", "push", "pid", "plans"}
        self._peers: dict[str, dict] = {}
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
        if any(r.mem_type != "VRAM" or r.length <= 0 for r in md["regions"]):
            raise ValueError(f"peer {name!r} registers regions that are not CUDA memory: "
                             f"{md['regions']!r:.200}")
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
            self._peers[name] = {"tensors": tensors, "push": push, "pid": md["pid"],
                                 "lengths": [r.length for r in md["regions"]], "plans": {}}
            self._peer_regions[name] = md["regions"]
        return name

    def remove_peer(self, name: str) -> None:
        with self._lock:
            p = self._peers.pop(name, None)
            self._peer_regions.pop(name, None)
        if p is not None:
            p["plans"].clear()
            p["push"].close(0)

    def _alive(self, peer: str, op: str) -> dict:
        p = self._peers.get(peer)
        if p is None or not _pid_alive(p["pid"]):
            raise TransferError(f"cuda_ipc {op}: peer {peer!r} (pid {p and p['pid']}) is gone")
        return p

    def _views(self, p: dict, local_descs, remote_descs) -> list:
        """(local view, remote view) uint8 tensor pairs, one per merged copy; the plan of a
        desc list equal to one of the last 64 planned for this peer is reused."""
        try:
            key = (tuple(local_descs), tuple(remote_descs))
            views = p["plans"].get(key)
        except TypeError:  # unhashable (lists) or not iterable: planned every time
            key, views = None, None
        if views is not None:
            return views
        spans = plan_copies(local_descs, remote_descs, self._lengths, p["lengths"])
        remote = p["tensors"]
        views = [(self._flat[li][lo:lo + n], remote[ri][ro:ro + n])
                 for (li, lo, n), (ri, ro, _) in spans]
        if key is not None:
            with self._lock:  # (pulls of several threads plan at once)
                plans = p["plans"]
                if len(plans) >= _PLAN_CACHE_SIZE:
                    plans.pop(next(iter(plans)), None)
                plans[key] = views
        return views

    def _copy(self, op: str, peer: str, local_descs, remote_descs, timeout_s) -> None:
        timeout = self._deadline(timeout_s)
        self._peer(peer, op)
        p = self._alive(peer, op)
        views = self._views(p, local_descs, remote_descs)
        start = time.monotonic()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            if op == "write":
                for a, b in views:
                    b.copy_(a, non_blocking=True)
            else:
                for a, b in views:
                    a.copy_(b, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self._wait(done, start, timeout, op, peer)
        self._alive(peer, op)

    def _wait(self, done: torch.cuda.Event, start: float, timeout: float, op: str,
              peer: str) -> None:
        """Spin on ``done`` for ``spin_s``, then poll it with sleeps; TransferError at the
        deadline."""
        deadline = start + timeout
        spin_until = min(deadline, start + self.spin_s)
        while not done.query():
            now = time.monotonic()
            if now > spin_until:
                if now > deadline:
                    raise TransferError(
                        f"cuda_ipc {op} to peer {peer!r} did not finish within {timeout:g} s")
                time.sleep(self.poll_interval_s)

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
