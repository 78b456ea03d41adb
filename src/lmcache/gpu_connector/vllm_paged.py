"""VLLMPagedMemGPUConnectorV2: the all-layers paged connector, whose transfers run the csrc kernels.

Same MemoryObj format and semantics as the torch connector (KV_2LTD ``[2, L, T, H*D]``,
KV_MLA_FMT ``[1, L, T, D]``; store rejects padding slots, retrieve skips them), but when the KV
cache is on a CUDA device a batched call runs the paged-KV kernel of ``csrc/vllm_paged.cu``:
``transfer="mapped"`` moves every chunk in ONE launch that reads/writes the pinned MemoryObjs
directly through their mapped addresses; ``transfer="dma"`` (default, 2-5 % faster on the H200,
docs/GPU_NOTES.md) lets the copy engine move the bytes over PCIe through two device staging
buffers, one kernel launch per chunk group, pipelined. ``backend`` chooses: ``"cupy"`` (kernels,
error without CuPy/CUDA), ``"torch"`` (the parent's torch path everywhere), ``"auto"`` (kernels
when CuPy sees a GPU and the cache is on it, torch otherwise, e.g. on CPU-only machines and CI).

Stream ordering (DESIGN §6, the races vLLM's offloader had):
  - store: ``store_stream`` waits on an event recorded on the caller's current (compute) stream,
    so it reads the cache only after the forward pass that wrote it;
  - retrieve: ``load_stream`` waits likewise, so it never overwrites pages that compute queued
    earlier still reads (blocks freed by finished requests and handed to this one);
  - both calls return only after their copy finished (host wait): the MemoryObjs are complete
    (store) or no longer read (retrieve) when the engine hands them on or frees them, and the
    pages the copy read may be freed and reused right away. ``synchronize()`` waits for both
    streams (for callers that enqueue on them directly).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Optional

import torch

from lmcache.gpu_connector.base import _check_batch
from lmcache.gpu_connector.cupy_kernels import cupy_available, launch_transfer
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.staging import StagingRing
from lmcache.gpu_connector.paged_torch import TorchPagedMemGPUConnector
from lmcache.memory.memory_obj import MemoryObj
from lmcache.metadata import LMCacheMetadata

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cupy", "torch")
TRANSFERS = ("dma", "mapped")


def resolve_backend(backend: str) -> str:
    """``"cupy"`` or ``"torch"`` for a configured ``backend`` value.

    Raises:
        ValueError: ``backend`` is not one of auto, cupy, torch.
        RuntimeError: ``"cupy"`` was asked for but CuPy or a CUDA device is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"gpu_connector backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cupy" and not cupy_available():
        raise RuntimeError(
            "gpu_connector backend 'cupy' needs CuPy and a CUDA device "
            "(pip install 'lmcache[cuda12]' or 'lmcache[cuda13]'), or use backend: auto|torch"
        )
    if backend == "auto":
        return "cupy" if cupy_available() else "torch"
    return backend


class CopyStreams:
    """The store_stream and load_stream of one CUDA device (created on first use)."""

    def __init__(self) -> None:
        self._streams: dict[int, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}

    def get(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        """``(store_stream, load_stream)`` of ``device``."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = (torch.cuda.Stream(index), torch.cuda.Stream(index))
        return self._streams[index]

    def synchronize(self) -> None:
        """Block until every copy enqueued on any of these streams finished."""
        for store, load in self._streams.values():
            store.synchronize()
            load.synchronize()


class VLLMPagedMemGPUConnectorV2(TorchPagedMemGPUConnector):
    """TorchPagedMemGPUConnector with the CuPy kernel path (see module docstring).

    Args:
        metadata: the worker's LMCacheMetadata.
        layout: the layer tensors' KVCacheLayout.
        backend: ``"auto"`` (default), ``"cupy"`` or ``"torch"``.
        transfer: kernel path only. ``"dma"`` (default): the copy engine moves the bytes over
            PCIe into two device staging buffers of ``staging_mib`` MiB (grown to one chunk if
            smaller) and the kernel scatters/gathers them in device memory, pipelined
            (lmcache.gpu_connector.staging); ``"mapped"``: the kernel reads/writes the pinned
            MemoryObjs directly, no staging memory. Same bytes either way; docs/GPU_NOTES.md
            has the measured speeds.
        staging_mib: size of each staging buffer for ``"dma"``, MiB (> 0).

    Raises:
        ValueError / RuntimeError: see :func:`resolve_backend`; bad transfer or staging_mib;
            the parent's checks.
    """

    def __init__(
        self, metadata: LMCacheMetadata, layout: KVCacheLayout, backend: str = "auto",
        transfer: str = "dma", staging_mib: int = 32,
    ) -> None:
        super().__init__(metadata, layout)
        self.backend = resolve_backend(backend)
        if transfer not in TRANSFERS:
            raise ValueError(f"gpu_connector transfer must be one of {TRANSFERS}, got {transfer!r}")
        if isinstance(staging_mib, bool) or not isinstance(staging_mib, int) or staging_mib <= 0:
            raise ValueError(f"gpu_connector staging_mib must be an int > 0, got {staging_mib!r}")
        self.transfer = transfer
        self.staging = StagingRing(staging_mib << 20)
        self.streams = CopyStreams()
        self._checked_caches: Optional[tuple] = None
        self._checked_ids: Optional[tuple] = None  # (ids, weakrefs to the tensors, first data_ptr)

    def uses_kernels(self, kvcaches: Sequence[torch.Tensor]) -> bool:
        """True when a transfer over ``kvcaches`` runs the CuPy kernels."""
        return self.backend == "cupy" and bool(kvcaches) and kvcaches[0].is_cuda

    def synchronize(self) -> None:
        """Wait until every copy this connector enqueued finished (no-op on the torch path)."""
        self.streams.synchronize()

    def validate_kvcaches(self, kvcaches: object) -> None:
        """The parent's check, skipped when the same tensors (pointers, shapes, strides,
        dtypes) were checked last time: the engine checks on every call, vLLM never changes
        them."""
        if isinstance(kvcaches, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in kvcaches):
            ids = tuple(map(id, kvcaches))
            if self._checked_ids is not None and ids == self._checked_ids[0] and all(
                    a is r() for a, r in zip(kvcaches, self._checked_ids[1])) and \
                    kvcaches[0].data_ptr() == self._checked_ids[2]:
                return  # the very tensors checked last time (vLLM passes the same list)
            key = tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in kvcaches)
            if key != self._checked_caches:
                super().validate_kvcaches(kvcaches)
                self._checked_caches = key
            self._checked_ids = (ids, tuple(weakref.ref(t) for t in kvcaches),
                                 kvcaches[0].data_ptr())
            return
        super().validate_kvcaches(kvcaches)

    def batched_from_gpu(
        self, memory_objs: Sequence[MemoryObj], starts: Sequence[int], ends: Sequence[int],
        **kwargs,
    ) -> None:
        """Gather every chunk ``[starts[i], ends[i])`` into ``memory_objs[i]`` in one launch.

        Raises:
            ValueError: bad kwargs or objects, a slot outside the cache, or a padding slot
                (< 0: no KV to store); the objects' contents are then undefined.
        """
        kvcaches = kwargs.get("kvcaches")
        if not (isinstance(kvcaches, (list, tuple)) and self.uses_kernels(kvcaches)):
            return super().batched_from_gpu(memory_objs, starts, ends, **kwargs)
        self._transfer(memory_objs, starts, ends, kwargs, to_paged=False)

    def batched_to_gpu(
        self, memory_objs: Sequence[MemoryObj], starts: Sequence[int], ends: Sequence[int],
        **kwargs,
    ) -> None:
        """Scatter every ``memory_objs[i]`` into tokens ``[starts[i], ends[i])`` in one launch.

        Padding slots (< 0) are skipped. Raises ValueError on bad kwargs/objects or a slot
        outside the cache (the other tokens were written).
        """
        kvcaches = kwargs.get("kvcaches")
        if not (isinstance(kvcaches, (list, tuple)) and self.uses_kernels(kvcaches)):
            return super().batched_to_gpu(memory_objs, starts, ends, **kwargs)
        self._transfer(memory_objs, starts, ends, kwargs, to_paged=True)

    def submit_from_gpu(
        self, memory_objs: Sequence[MemoryObj], starts: Sequence[int], ends: Sequence[int],
        **kwargs,
    ) -> "PendingTransfer":
        """:meth:`batched_from_gpu` without the host wait: the gather is enqueued on
        ``store_stream`` after an event recorded on the caller's current (compute) stream, so it
        reads the KV only after the compute enqueued before this call wrote it; the caller waits
        with ``.wait()`` before reading the objects. The objects and the pages they are read
        from must stay alive and unchanged until then. On the torch path (CPU caches, no CuPy)
        the copy is done before this returns.

        Raises:
            ValueError: bad kwargs or objects (now); a slot outside the cache or a padding slot
                (from ``.wait()`` on the kernel path).
        """
        kvcaches = kwargs.get("kvcaches")
        if not (isinstance(kvcaches, (list, tuple)) and self.uses_kernels(kvcaches)):
            super().batched_from_gpu(memory_objs, starts, ends, **kwargs)
            return PendingTransfer(None, False)
        return self._transfer(memory_objs, starts, ends, kwargs, to_paged=False, wait=False)

    def submit_to_gpu(
        self, memory_objs: Sequence[MemoryObj], starts: Sequence[int], ends: Sequence[int],
        **kwargs,
    ) -> "PendingTransfer":
        """:meth:`batched_to_gpu` without the host wait: the scatter is enqueued on
        ``load_stream`` after an event recorded on the caller's current stream; the objects must
        stay alive and unchanged until ``.wait()`` returned. On the torch path the copy is done
        before this returns.

        Raises:
            ValueError: bad kwargs or objects (now); a slot outside the cache (``.wait()``).
        """
        kvcaches = kwargs.get("kvcaches")
        if not (isinstance(kvcaches, (list, tuple)) and self.uses_kernels(kvcaches)):
            super().batched_to_gpu(memory_objs, starts, ends, **kwargs)
            return PendingTransfer(None, False)
        return self._transfer(memory_objs, starts, ends, kwargs, to_paged=True, wait=False)

    # ---- kernel path ------------------------------------------------------------------
    def _transfer(self, memory_objs, starts, ends, kwargs, *, to_paged: bool, wait: bool = True):
        kvcaches = kwargs["kvcaches"]
        self.validate_kvcaches(kvcaches)
        slot_mapping, offset = _slot_kwargs(kwargs)
        _check_batch(memory_objs, starts, ends)
        device = kvcaches[0].device
        tensors, slot_starts = [], []
        for obj, start, end in zip(memory_objs, starts, ends):
            self._check_obj(obj, start, end, offset)
            tensors.append(obj.tensor)
            slot_starts.append(start - offset)
        store_stream, load_stream = self.streams.get(device)
        stream = load_stream if to_paged else store_stream
        # the copy follows everything enqueued so far on the compute stream (an event there)
        stream.wait_event(torch.cuda.current_stream(device).record_event())
        if self.transfer == "dma" and not all(t.is_cuda for t in tensors):
            pending = PendingTransfer(self.staging.enqueue(
                kvcaches, self.layout, tensors, slot_mapping, slot_starts, to_paged=to_paged,
                kernel_stream=stream), not to_paged)
        else:
            handle = self._mapped(kvcaches, tensors, slot_mapping, slot_starts, to_paged, stream)
            pending = PendingTransfer(_Done([handle]), not to_paged)
        if wait:
            pending.wait()
        return pending

    def _mapped(self, kvcaches, tensors, slot_mapping, slot_starts, to_paged, stream):
        """One launch over every chunk; pageable objects go through device copies."""
        device = kvcaches[0].device
        staged = []
        for i, tensor in enumerate(tensors):
            if not tensor.is_cuda and not tensor.is_pinned():
                staged.append((tensor, torch.empty_like(tensor, device=device)))
                tensors[i] = staged[-1][1]
        if staged and to_paged:
            with torch.cuda.stream(stream):
                for host, dev in staged:
                    dev.copy_(host)
        handle = launch_transfer(kvcaches, self.layout, tensors, slot_mapping, slot_starts,
                                 to_paged=to_paged, single_layer=False, stream=stream)
        handle.wait()
        if staged and not to_paged:
            for host, dev in staged:
                host.copy_(dev)
        return handle

    def _check_obj(self, obj: MemoryObj, start: int, end: int, offset: int) -> None:
        if not isinstance(start, int) or not isinstance(end, int) or not offset <= start <= end:
            raise ValueError(
                f"need ints offset={offset} <= start <= end, got start={start!r}, end={end!r}"
            )
        tensor = obj.tensor
        want = self.get_shape(end - start)
        if tensor.shape != want or tensor.dtype != self.metadata.kv_dtype or obj.fmt != self.fmt:
            raise ValueError(
                f"MemoryObj for tokens [{start}, {end}) has shape {tuple(tensor.shape)} dtype "
                f"{tensor.dtype} fmt {obj.fmt.name}; expected {tuple(want)} "
                f"{self.metadata.kv_dtype} {self.fmt.name}"
            )


class _Done:
    def __init__(self, handles) -> None:
        self.handles = handles

    def query(self) -> bool:
        return True

    def wait(self):
        return self.handles


class PendingTransfer:
    """A transfer enqueued by :meth:`VLLMPagedMemGPUConnectorV2.submit_from_gpu`."""

    def __init__(self, staged, check_padding: bool) -> None:
        self._staged = staged
        self._check_padding = check_padding

    def query(self) -> bool:
        """True when the copy has finished (non-blocking)."""
        return self._staged is None or self._staged.query()

    def wait(self) -> None:
        """Block until the copy finished.

        Raises:
            ValueError: a slot outside the cache; a padding slot (< 0) in a stored range.
        """
        if self._staged is None:
            return
        staged, self._staged = self._staged, None
        handles = staged.wait()
        if self._check_padding and any(h.saw_padding for h in handles):
            raise ValueError("slot_mapping holds padding slots (< 0) in a stored range: "
                             "padding has no KV to store")


def _slot_kwargs(kwargs: dict) -> tuple[torch.Tensor, int]:
    """``(slot_mapping, offset)`` from the connector kwargs, checked."""
    slot_mapping = kwargs.get("slot_mapping")
    offset = kwargs.get("offset", 0)
    if (
        not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1
        or slot_mapping.dtype.is_floating_point or slot_mapping.dtype == torch.bool
    ):
        raise ValueError(f"slot_mapping must be a 1-D integer torch.Tensor, got {slot_mapping!r:.80}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    return slot_mapping, offset
