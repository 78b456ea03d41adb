"""The transfer channel contract: one data path between lmcache instances (PD and P2P).

A channel registers host or GPU memory regions (normally the CPU allocator's buffer) and moves
bytes between its regions and a peer's registered regions, one-sided (the peer's CPU does not take
part). Control messages (allocation requests, notices) travel over ZMQ, never over the channel.

Descs name bytes inside registered regions:
    (offset, length)                 inside region 0, or
    (region_index, offset, length)   inside region ``region_index``;
offsets and lengths are in bytes, relative to the region's first byte.
"""

from __future__ import annotations

import abc
import threading
from typing import Iterable, Optional, Sequence, Union

import msgpack
import torch

Desc = Union[tuple[int, int], tuple[int, int, int]]

#: Largest metadata blob add_peer accepts (an agent's NIXL metadata is a few KiB).
MAX_METADATA_BYTES = 16 << 20
MAX_REGIONS = 1024


class TransferError(RuntimeError):
    """A transfer, notification or peer operation failed or ran past its deadline.

    The message names the peer, the operation and the cause. After a failed ``read`` the bytes of
    the local descs are undefined; after a failed ``write`` the peer's bytes are undefined.
    """


class RegionInfo(tuple):
    """(address, length, device_id, mem_type) of one registered region ("DRAM" or "VRAM")."""

    __slots__ = ()

    def __new__(cls, address: int, length: int, device_id: int, mem_type: str):
        return super().__new__(cls, (int(address), int(length), int(device_id), str(mem_type)))

    address = property(lambda self: self[0])
    length = property(lambda self: self[1])
    device_id = property(lambda self: self[2])
    mem_type = property(lambda self: self[3])


def region_info(tensor: torch.Tensor) -> RegionInfo:
    """Describe one region tensor; ValueError unless it is a contiguous tensor with > 0 bytes."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"a region must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_contiguous():
        raise ValueError(f"a region must be contiguous, got strides {tuple(tensor.stride())}")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes <= 0:
        raise ValueError("a region must hold at least one byte")
    if tensor.device.type == "cpu":
        return RegionInfo(tensor.data_ptr(), nbytes, 0, "DRAM")
    if tensor.device.type == "cuda":
        return RegionInfo(tensor.data_ptr(), nbytes, tensor.device.index or 0, "VRAM")
    raise ValueError(f"a region must be on cpu or cuda, got device {tensor.device}")


def resolve_descs(
    descs: Sequence[Desc], regions: Sequence[RegionInfo], side: str
) -> list[tuple[int, int, int, str]]:
    """Turn descs into (address, length, device_id, mem_type); ValueError naming a bad desc."""
    out = []
    for i, d in enumerate(descs):
        if not isinstance(d, (tuple, list)) or len(d) not in (2, 3):
            raise ValueError(f"{side} desc {i} must be (offset, length) or "
                             f"(region, offset, length), got {d!r}")
        region, offset, length = (0, *d) if len(d) == 2 else d
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (region, offset, length)):
            raise ValueError(f"{side} desc {i} must hold ints, got {d!r}")
        if not 0 <= region < len(regions):
            raise ValueError(f"{side} desc {i} names region {region}; there are {len(regions)} regions")
        r = regions[region]
        if offset < 0 or length <= 0 or offset + length > r.length:
            raise ValueError(
                f"{side} desc {i} = (region {region}, offset {offset}, length {length}) "
                f"is outside region {region} of {r.length} bytes"
            )
        out.append((r.address + offset, length, r.device_id, r.mem_type))
    return out


def check_pairs(local: Sequence[tuple], remote: Sequence[tuple]) -> None:
    """ValueError unless the two resolved desc lists pair up with equal lengths."""
    if len(local) != len(remote):
        raise ValueError(f"{len(local)} local descs but {len(remote)} remote descs")
    if not local:
        raise ValueError("no descs to transfer")
    for i, (a, b) in enumerate(zip(local, remote)):
        if a[1] != b[1]:
            raise ValueError(f"desc {i}: local length {a[1]} != remote length {b[1]}")
    if len({d[3] for d in local}) > 1 or len({d[3] for d in remote}) > 1:
        raise ValueError("one transfer must not mix DRAM and VRAM descs on one side")


def pack_metadata(name: str, kind: str, regions: Iterable[RegionInfo], **extra) -> bytes:
    """This agent's metadata blob (msgpack map)."""
    return msgpack.packb(
        {"v": 1, "kind": kind, "name": name, "regions": [list(r) for r in regions], **extra},
        use_bin_type=True,
    )


def unpack_metadata(blob: bytes, kind: str) -> dict:
    """Parse a peer's metadata blob with size limits; ValueError when malformed."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ValueError(f"peer metadata must be bytes, got {type(blob).__name__}")
    if len(blob) > MAX_METADATA_BYTES:
        raise ValueError(f"peer metadata is {len(blob)} bytes, more than {MAX_METADATA_BYTES}")
    try:
        md = msgpack.unpackb(bytes(blob), raw=False, max_bin_len=MAX_METADATA_BYTES,
                             max_array_len=MAX_REGIONS * 4, max_map_len=64)
    except Exception as e:  # msgpack raises several types
        raise ValueError(f"peer metadata is not a msgpack map: {e}") from None
    if not isinstance(md, dict) or md.get("v") != 1:
        raise ValueError("peer metadata is not version-1 lmcache channel metadata")
    if md.get("kind") != kind:
        raise ValueError(f"peer metadata is for a {md.get('kind')!r} channel, this is {kind!r}")
    name = md.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("peer metadata has no agent name")
    regions = md.get("regions")
    if not isinstance(regions, list) or len(regions) > MAX_REGIONS:
        raise ValueError("peer metadata has no valid region table")
    try:
        md["regions"] = [RegionInfo(*r) for r in regions]
    except Exception:
        raise ValueError(f"peer metadata has a malformed region table: {regions!r}") from None
    return md


class TransferChannel(abc.ABC):
    """Moves bytes between this agent's registered regions and a peer's (see module doc).

    Thread-safe. Every blocking call returns or raises TransferError within its deadline.
    """

    def __init__(self, agent_name: str, regions: Sequence[torch.Tensor], timeout_s: float = 5.0):
        if not isinstance(agent_name, str) or not agent_name:
            raise ValueError(f"agent_name must be a non-empty str, got {agent_name!r}")
        if isinstance(regions, torch.Tensor):
            regions = [regions]
        if not regions:
            raise ValueError("a channel needs at least one region to register")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self._name = agent_name
        self._regions = list(regions)
        self._region_infos = [region_info(t) for t in self._regions]
        self.timeout_s = float(timeout_s)
        self._lock = threading.RLock()
        self._peer_regions: dict[str, list[RegionInfo]] = {}
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def regions(self) -> list[torch.Tensor]:
        return list(self._regions)

    @property
    def peers(self) -> list[str]:
        with self._lock:
            return list(self._peer_regions)

    def _deadline(self, timeout_s: Optional[float]) -> float:
        t = self.timeout_s if timeout_s is None else float(timeout_s)
        if not t > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        return t

    def _peer(self, peer: str, op: str) -> list[RegionInfo]:
        if self._closed:
            raise TransferError(f"{op} to {peer!r}: channel {self._name!r} is closed")
        with self._lock:
            regions = self._peer_regions.get(peer)
        if regions is None:
            raise TransferError(f"{op}: unknown peer {peer!r} (known: {sorted(self._peer_regions)})")
        return regions

    @abc.abstractmethod
    def agent_metadata(self) -> bytes: ...

    @abc.abstractmethod
    def add_peer(self, metadata: bytes) -> str: ...

    @abc.abstractmethod
    def remove_peer(self, name: str) -> None: ...

    @abc.abstractmethod
    def read(self, peer: str, local_descs: Sequence[Desc], remote_descs: Sequence[Desc],
             timeout_s: Optional[float] = None) -> None: ...

    @abc.abstractmethod
    def write(self, peer: str, local_descs: Sequence[Desc], remote_descs: Sequence[Desc],
              notify: Optional[bytes] = None, timeout_s: Optional[float] = None) -> None: ...

    @abc.abstractmethod
    def send_notification(self, peer: str, msg: bytes) -> None: ...

    @abc.abstractmethod
    def poll_notifications(self) -> list[tuple[str, bytes]]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
