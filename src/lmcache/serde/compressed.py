"""The self-describing stream that every compressing serde (cachegen, kivi, fp8) writes.

Payload layout (little-endian), sent with remote metadata ``fmt=BINARY, dtype=none,
shape=(len,)`` so that any lmcache reader knows it is not raw KV::

    magic b"LMCZ" | version u8 | codec u8 | fmt u8 | dtype code u8 | ndim u8 | 3 pad bytes
    | shape 4 x u32 (unused = 0) | codec body                         (HEADER_SIZE = 32)

``codec`` is one of :data:`CODECS` (1 cachegen, 2 kivi, 3 fp8); ``fmt``/``dtype``/``shape``
describe the MemoryObj the stream decodes into. A reader decodes a stream by the codec named in
its own header, whatever serde it is configured with; a stream with another magic, a newer
``version`` or an unknown codec raises :class:`ValueError`, which the remote tier turns into a
miss (never a crash, never wrong KV).

KV tensors are compressed in the *canonical view* ``[K, L, T, D]`` (K = 2 for K/V or 1 for MLA,
L layers, T tokens, D = heads x head_size): ``KV_2LTD`` and ``KV_MLA_FMT`` are that view,
``KV_2TD`` is ``[2, 1, T, D]`` and ``KV_T2D`` (layerwise) is permuted to it.
"""

from __future__ import annotations

import importlib
import struct
from typing import Callable, Optional

import torch

from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.serde.base import Allocating, Buffer, RemoteMetadata, Serde

MAGIC = b"LMCZ"
VERSION = 1
HEADER = struct.Struct("<4sBBBBB3x4I")
HEADER_SIZE = HEADER.size  # 32
#: codec tag -> (name, "module:decode function"); the decode function maps
#: (body memoryview, K, L, T, D, device, original dtype) -> tensor [K, L, T, D] on device.
CODECS: dict[int, tuple[str, str]] = {
    1: ("cachegen", "lmcache.serde.cachegen:decode_body"),
    2: ("kivi", "lmcache.serde.kivi:decode_body"),
    3: ("fp8", "lmcache.serde.fp8:decode_body"),
}
KV_FORMATS = (MemoryFormat.KV_2LTD, MemoryFormat.KV_MLA_FMT, MemoryFormat.KV_2TD,
              MemoryFormat.KV_T2D)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn,
                torch.float8_e5m2)
#: dtype codes of the stream header (LMCache's wire codes for these dtypes)
DTYPE_CODES = {torch.float16: 2, torch.bfloat16: 3, torch.float32: 4,
               torch.float8_e4m3fn: 7, torch.float8_e5m2: 8}
_CODE_DTYPES = {c: d for d, c in DTYPE_CODES.items()}


def to_canonical(tensor: torch.Tensor, fmt: MemoryFormat) -> torch.Tensor:
    """View (or permuted view) ``[K, L, T, D]`` of a KV tensor in ``fmt``.

    Raises:
        ValueError: ``fmt`` is not a KV format or the rank does not match it.
    """
    want = 3 if fmt in (MemoryFormat.KV_2TD, MemoryFormat.KV_T2D) else 4
    if fmt not in KV_FORMATS or tensor.dim() != want:
        raise ValueError(f"cannot compress a {tensor.dim()}-D tensor of format {fmt!r}; "
                         f"expected one of {[f.name for f in KV_FORMATS]}")
    if fmt == MemoryFormat.KV_2TD:
        return tensor.unsqueeze(1)
    if fmt == MemoryFormat.KV_T2D:
        return tensor.permute(1, 0, 2).unsqueeze(1)
    return tensor


def from_canonical(x: torch.Tensor, fmt: MemoryFormat) -> torch.Tensor:
    """Inverse of :func:`to_canonical` (a view; the caller copies it where it belongs)."""
    if fmt == MemoryFormat.KV_2TD:
        return x[:, 0]
    if fmt == MemoryFormat.KV_T2D:
        return x[:, 0].permute(1, 0, 2)
    return x


def pack_header(codec: int, fmt: MemoryFormat, dtype: torch.dtype, shape) -> bytes:
    """The 32-byte stream header."""
    dims = list(shape) + [0] * (4 - len(shape))
    return HEADER.pack(MAGIC, VERSION, codec, int(fmt), DTYPE_CODES[dtype], len(shape), *dims)


def is_stream(payload: Buffer) -> bool:
    """True when ``payload`` starts with the stream magic (any version or codec)."""
    view = memoryview(payload).cast("B")
    return view.nbytes >= len(MAGIC) and bytes(view[: len(MAGIC)]) == MAGIC


def parse_header(payload: Buffer) -> tuple[str, Callable, MemoryFormat, torch.dtype, tuple]:
    """(codec name, decode function, fmt, dtype, shape) of a stream.

    Raises:
        ValueError: short stream, foreign magic, a version newer than :data:`VERSION`, an
            unknown codec, fmt or dtype, or a shape that is not a KV shape of that fmt.
    """
    view = memoryview(payload).cast("B")
    if view.nbytes < HEADER_SIZE:
        raise ValueError(f"compressed stream is {view.nbytes} bytes, shorter than its header")
    magic, version, codec, fmt, code, ndim, *dims = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise ValueError(f"not an lmcache compressed stream (magic {magic!r}, expected {MAGIC!r})")
    if version > VERSION or version < 1:
        raise ValueError(f"compressed stream version {version} is not supported "
                         f"(this lmcache reads version {VERSION})")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec} in compressed stream; known {sorted(CODECS)}")
    try:
        fmt = MemoryFormat(fmt)
    except ValueError:
        raise ValueError(f"unknown MemoryFormat {fmt} in compressed stream") from None
    dtype = _CODE_DTYPES.get(code)
    if dtype not in FLOAT_DTYPES or not 3 <= ndim <= 4 or min(dims[:ndim]) < 1:
        raise ValueError(f"compressed stream describes dtype code {code}, shape "
                         f"{dims[:ndim]}: not a KV tensor")
    name, target = CODECS[codec]
    module, func = target.split(":")
    return name, getattr(importlib.import_module(module), func), fmt, dtype, tuple(dims[:ndim])


def decode_stream(payload: Buffer, allocator_backend: Allocating,
                  device: str = "cpu") -> Optional[MemoryObj]:
    """Decode a stream of any codec into a new MemoryObj from ``allocator_backend``.

    Returns None when the allocator has no room. Decoding runs on ``device`` (``"cuda"``: the
    arithmetic on the GPU, the result copied into the CPU MemoryObj).

    Raises:
        ValueError: see :func:`parse_header`; a body inconsistent with its header.
    """
    view = memoryview(payload).cast("B")
    _, decode, fmt, dtype, shape = parse_header(view)
    empty = torch.empty(shape, dtype=torch.uint8, device="meta")
    k, layers, tokens, dim = to_canonical(empty, fmt).shape
    try:
        x = decode(view[HEADER_SIZE:], k, layers, tokens, dim, device, dtype)
    except (IndexError, RuntimeError, struct.error) as e:
        raise ValueError(f"corrupt compressed stream body: {e}") from None
    obj = allocator_backend.allocate(torch.Size(shape), dtype, fmt)
    if obj is None:
        return None
    to_canonical(obj.tensor, fmt).copy_(x.to(dtype))
    return obj


class CompressingSerde(Serde):
    """Base of the compressing serdes: KV MemoryObjs become a stream; anything else (raw
    bytes, non-float dtypes) goes out as :class:`NaiveSerde` would write it. Reading
    accepts raw (naive) payloads and streams of every codec.

    Subclasses set ``codec`` and implement :meth:`encode_body`.

    Args:
        device: where the arithmetic runs: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when
            torch sees a GPU).
    """

    codec: int = 0

    def __init__(self, device: str = "cpu") -> None:
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or 'auto'")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device

    def encode_body(self, x: torch.Tensor, dtype: torch.dtype) -> bytes:
        """Body bytes for the canonical KV ``x`` ``[K, L, T, D]`` on ``self.device``."""
        raise NotImplementedError

    def serialize(self, obj: MemoryObj) -> tuple[RemoteMetadata, Buffer]:
        """(BINARY metadata, stream bytes) for a KV object; naive bytes for anything else."""
        from lmcache.serde.naive import NaiveSerde

        tensor = obj.tensor
        if tensor.device.type != "cpu":
            raise ValueError(f"{type(self).__name__} needs a CPU MemoryObj, got {tensor.device}")
        if obj.fmt not in KV_FORMATS or tensor.dtype not in FLOAT_DTYPES or tensor.numel() == 0:
            return NaiveSerde().serialize(obj)
        x = to_canonical(tensor, obj.fmt).to(self.device)
        stream = pack_header(self.codec, obj.fmt, tensor.dtype, tensor.shape) + \
            self.encode_body(x, tensor.dtype)
        return RemoteMetadata(len(stream), MemoryFormat.BINARY, None, (len(stream),)), stream

    def deserialize(self, meta: RemoteMetadata, payload: Buffer,
                    allocator_backend: Allocating) -> Optional[MemoryObj]:
        """Decode a stream (any codec, by its header) or copy a raw payload (naive).

        Raises:
            ValueError: foreign/newer/corrupt stream, or payload inconsistent with ``meta``.
        """
        from lmcache.serde.naive import NaiveSerde

        if meta.fmt == MemoryFormat.BINARY and is_stream(payload):
            return decode_stream(payload, allocator_backend, self.device)
        return NaiveSerde().deserialize(meta, payload, allocator_backend)
