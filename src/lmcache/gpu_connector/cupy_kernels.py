"""The paged-KV CUDA kernels of ``csrc/``, compiled at run time through CuPy, and their launcher.

``csrc/vllm_paged.cu`` (multi-layer, KV_2LTD / KV_MLA_FMT) and ``csrc/vllm_layerwise.cu``
(single layer, KV_T2D) are built with ``cupy.RawModule`` the first time they are used on a device
(CuPy keeps the compiled binary in its on-disk kernel cache, so later processes skip NVRTC) and
launched on a caller-given torch CUDA stream. The kernels move raw bytes (16-byte words when every
pointer, stride and head size allows), so results are bit-identical to the torch reference
``lmcache.gpu_connector.kv_transfer`` for every dtype and layout. MemoryObjs in pinned host memory
are read and written directly by the kernel through their UVA-mapped address (no staging copy);
device tensors work too.

The source files are looked up in the installed package (``lmcache/csrc/*.cu``, see
:func:`csrc_dir`) and then in the source tree (``<repo>/csrc``). Nothing here imports CuPy until a
kernel is launched, so the module imports on CPU-only machines.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.transfer_plan import (
    DESC_WORDS,
    TransferPlan,
    device_address,
    plan_transfer,
)

__all__ = ["cupy_available", "csrc_dir", "kernel_source", "TransferHandle", "launch_transfer"]

_ENTRY = {"vllm_paged": "multi_layer_kv", "vllm_layerwise": "single_layer_kv"}
_MAX_GRID_Y = 65535

# Launch shape. Defaults chosen by the H200 measurements in docs/GPU_NOTES.md; scripts/bench_gpu.py
# sweeps them. threads <= 256 (__launch_bounds__); rows_per_thread is compiled in
# (LMC_ROWS_PER_THREAD); max_grid_x caps blocks per chunk (the kernel loops over the rest).
# l2_prefetch (0, 128, 256) adds that L2 prefetch-size hint to the 16-byte loads (LMC_L2_PREFETCH).
TUNING = {"threads": 256, "rows_per_thread": 4, "max_grid_x": 1 << 16, "l2_prefetch": 0}


@functools.lru_cache(maxsize=1)
def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device (never raises)."""
    try:
        import cupy  # noqa: PLC0415

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError, missing driver: all mean "no"
        return False


def csrc_dir() -> Path:
    """The folder holding the kernel sources.

    Looks for ``lmcache/csrc`` inside the installed package (package data), then for ``csrc/``
    at the root of the source tree this module lives in.

    Raises:
        FileNotFoundError: neither exists; the message names both paths.
    """
    candidates = []
    try:
        candidates.append(Path(str(importlib.resources.files("lmcache") / "csrc")))
    except (ModuleNotFoundError, TypeError):
        pass
    candidates.append(Path(__file__).resolve().parents[3] / "csrc")
    for path in candidates:
        if (path / "vllm_paged.cu").is_file():
            return path
    raise FileNotFoundError(
        "CUDA kernel sources not found; looked in "
        + ", ".join(str(p) for p in candidates)
        + " (an installed lmcache must ship csrc/*.cu and *.cuh as package data lmcache/csrc)"
    )


def kernel_source(name: str) -> str:
    """Source of ``csrc/<name>.cu`` with its local ``#include "x.cuh"`` lines inlined.

    Inlining makes the text CuPy hashes for its kernel cache cover the headers too.

    Raises:
        ValueError: unknown kernel file name.
    """
    if name not in _ENTRY:
        raise ValueError(f"unknown kernel file {name!r}, expected one of {sorted(_ENTRY)}")
    root = csrc_dir()

    def inline(match: re.Match) -> str:
        return re.sub(r"^#pragma once\s*$", "", (root / match.group(1)).read_text(), flags=re.M)

    return re.sub(r'^#include "([\w.]+)"\s*$', inline, (root / f"{name}.cu").read_text(), flags=re.M)


@functools.lru_cache(maxsize=None)
def _module(name: str, device_index: int, rows_per_thread: int, l2_prefetch: int):
    import cupy  # noqa: PLC0415

    options = ("-std=c++17", f"-DLMC_ROWS_PER_THREAD={int(rows_per_thread)}",
               f"-DLMC_L2_PREFETCH={int(l2_prefetch)}")
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=kernel_source(name), options=options)
        module.compile()
    return module


@functools.lru_cache(maxsize=None)
def _function(name: str, device_index: int, to_paged: bool, width: int, rows_per_thread: int,
              l2_prefetch: int):
    direction = "to_paged" if to_paged else "from_paged"
    module = _module(name, device_index, rows_per_thread, l2_prefetch)
    return module.get_function(f"{_ENTRY[name]}_{direction}_w{width}")


_CUPY_STREAMS: dict = {}


def _cupy_stream(stream: torch.cuda.Stream, device_index: int):
    """A CuPy view of a torch stream (cached: building one per launch costs time)."""
    key = (stream.cuda_stream, device_index)
    wrapped = _CUPY_STREAMS.get(key)
    if wrapped is None:
        import cupy  # noqa: PLC0415

        with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream for from_external
            warnings.simplefilter("ignore", DeprecationWarning)
            wrapped = cupy.cuda.ExternalStream(stream.cuda_stream, device_index)
        _CUPY_STREAMS[key] = (wrapped, stream)  # the torch stream is kept alive with it
    return _CUPY_STREAMS[key][0]


@dataclass
class TransferHandle:
    """An enqueued transfer: wait for it, or make another stream wait for it.

    Attributes:
        event: CUDA event recorded on the transfer's stream after its last launch.
        flag: pinned int32 ``[2]`` the kernel writes: ``[0]`` = 1 when a slot was >= the
            cache's slots (that token was skipped), ``[1]`` = 1 when a gather met a slot < 0
            (that token was written as zeros).
        keepalive: tensors the kernel reads or writes (MemoryObj views, descriptors); held so
            they are not freed or reused before the kernel finished.
        num_slots: the cache's number of slots (for the error message).
    """

    event: torch.cuda.Event
    flag: torch.Tensor
    keepalive: list
    num_slots: int
    device: torch.device

    def query(self) -> bool:
        """True when the transfer has finished (non-blocking)."""
        return self.event.query()

    def wait(self) -> None:
        """Block the host until the transfer finished, then check the out-of-range flag.

        Raises:
            ValueError: the slot mapping held a slot >= num_slots (those tokens were skipped;
                gathered rows hold zeros).
        """
        self.event.synchronize()
        self.keepalive.clear()
        if int(self.flag[0]) != 0:
            raise ValueError(
                f"slot_mapping holds a slot outside the KV cache (valid slots are "
                f"[-1, {self.num_slots - 1}]); those tokens were not transferred"
            )

    @property
    def saw_padding(self) -> bool:
        """After :meth:`wait`: a gather met a padding slot (< 0) and wrote zeros for it."""
        return int(self.flag[1]) != 0

    def wait_on(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Make ``stream`` (default: the current stream) wait for the transfer (no host block)."""
        (stream or torch.cuda.current_stream(self.device)).wait_event(self.event)


@functools.lru_cache(maxsize=8)
def _layer_table(device_index: int, addresses: tuple[int, ...]) -> torch.Tensor:
    # One int64 table of layer base addresses per distinct kvcaches list (vLLM keeps one);
    # made once, synchronously, on the default stream so every stream may read it.
    with torch.cuda.stream(torch.cuda.default_stream(device_index)):
        table = torch.tensor(addresses, dtype=torch.int64, device=f"cuda:{device_index}")
    torch.cuda.synchronize(device_index)
    return table


def launch_transfer(
    layer_tensors: Sequence[torch.Tensor],
    layout: KVCacheLayout,
    objs: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    slot_starts: Sequence[int],
    *,
    to_paged: bool,
    single_layer: bool,
    stream: Optional[torch.cuda.Stream] = None,
) -> TransferHandle:
    """Enqueue one kernel launch moving every chunk of ``objs`` (asynchronous).

    Args:
        layer_tensors: the paged tensors of ``layout`` (all layers; exactly one when
            ``single_layer``), CUDA, one device, one dtype. Not validated here (the connector
            checks shapes once): see ``KVCacheLayout.check_tensor``.
        layout: their layout.
        objs: per chunk, ``[2, L, T_c, H*D]`` (MLA ``[1, L, T_c, D]``) or, when
            ``single_layer``, ``[T_c, 2, H*D]`` (MLA ``[T_c, 1, D]``) tensors of the layers'
            dtype, each on that CUDA device or in pinned host memory (last dim contiguous).
        slot_mapping: int tensor of slots; chunk c's token t uses
            ``slot_mapping[slot_starts[c] + t]`` (< 0: gathered as zeros, never scattered).
        slot_starts: per chunk, index of its first token's slot in ``slot_mapping``.
        to_paged: True scatters ``objs`` into the cache (retrieve), False gathers (store).
        single_layer: KV_T2D objects and one layer tensor (the layerwise connector).
        stream: torch CUDA stream to run on (default: the current stream).

    Returns:
        A :class:`TransferHandle`; call ``wait()`` before reading gathered objects on the host or
        releasing any object, and to learn about out-of-range slots.

    Raises:
        ValueError / TypeError: an object on another device, in pageable host memory, of the
            wrong shape or dtype, or a slot range outside ``slot_mapping`` (see plan_transfer).
        RuntimeError: CuPy or CUDA is unavailable.
    """
    if not cupy_available():
        raise RuntimeError("the CuPy kernel path needs cupy and a CUDA device (pip install lmcache[cuda13])")
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    device = layer_tensors[0].device
    stream = stream or torch.cuda.current_stream(device)
    plan: TransferPlan = plan_transfer(
        layer_tensors, layout, objs, slot_mapping, slot_starts, single_layer=single_layer
    )
    dev_index = device.index if device.index is not None else torch.cuda.current_device()
    # one pinned buffer: the descriptors (copied to the device) and, after them, the two int32
    # error flags the kernel writes through the mapped pointer
    n = len(plan.descriptors) * DESC_WORDS
    host = torch.empty(n + 1, dtype=torch.int64, pin_memory=True)
    words = host.numpy()
    if n:
        words[:n] = np.asarray(plan.descriptors, dtype=np.int64).reshape(-1)
    words[n] = 0
    flag = host[n:].view(torch.int32)
    flag_address = device_address(host, device) + n * 8
    keep: list = [host, *objs]
    with torch.cuda.stream(stream):
        slots = slot_mapping.to(device=device, dtype=torch.int64, non_blocking=True)
        desc = host[:n].to(device, non_blocking=True)
        keep += [slots, desc]
        if single_layer:
            table_ptr, single_base = 0, plan.layer_addresses[0]
        else:
            table = _layer_table(dev_index, plan.layer_addresses)
            table_ptr, single_base = table.data_ptr(), 0
        name = "vllm_layerwise" if single_layer else "vllm_paged"
        threads, rows = TUNING["threads"], TUNING["rows_per_thread"]
        fn = _function(name, dev_index, to_paged, plan.word_bytes, rows, TUNING["l2_prefetch"])
        bx = min(threads, -(-plan.words_per_row // 32) * 32)
        by = max(1, threads // bx)
        gx = min(TUNING["max_grid_x"], max(1, -(-plan.max_rows // (by * rows))))
        s = plan.strides
        with cupy.cuda.Device(dev_index), _cupy_stream(stream, dev_index):
            for first in range(0, plan.num_chunks, _MAX_GRID_Y):
                gy = min(_MAX_GRID_Y, plan.num_chunks - first)
                fn((gx, gy, 1), (bx, by, 1), (
                    np.uint64(table_ptr), np.uint64(single_base),
                    np.uint64(desc.data_ptr() + first * plan.desc_bytes), np.uint64(slots.data_ptr()),
                    np.uint64(flag_address), np.int64(s.num_slots), np.int64(s.block),
                    np.int64(s.tok), np.int64(s.head), np.int64(s.kv), np.int32(plan.block_size),
                    np.int32(plan.num_layers), np.int32(s.num_kv), np.int32(plan.words_per_head),
                    np.int32(plan.words_per_row),
                ))
        event = torch.cuda.Event()
        event.record(stream)
    return TransferHandle(event=event, flag=flag, keepalive=keep, num_slots=s.num_slots, device=device)
