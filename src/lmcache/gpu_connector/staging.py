"""StagingRing: the "dma" transfer path, copy engine for PCIe plus the kernel in device memory.

The mapped path lets the paged-KV kernel read and write pinned host memory itself. On the H200
of docs/GPU_NOTES.md the copy engine moves PCIe bytes a few percent faster than SM loads and
stores can, so this path splits each transfer into groups of chunks and pipelines, through two
device buffers:

  retrieve:  copy_stream  DMA group g host -> buffer[g % 2]           (after buffer is free)
             kernel_stream  kernel buffer[g % 2] -> paged cache        (after the DMA)
  store:     kernel_stream  kernel paged cache -> buffer[g % 2]        (after buffer is free)
             copy_stream  DMA buffer[g % 2] -> host                    (after the kernel)

so the DMA of one group overlaps the kernel of the other, and no host wait happens until the
end. The kernel is the same one (``launch_transfer``) with device-memory MemoryObj views, so
results are bit-identical to the mapped path and to the torch reference. Device memory used: two
buffers of at least ``buffer_bytes`` each, grown to the largest chunk seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcache.gpu_connector.cupy_kernels import TransferHandle, launch_transfer
from lmcache.gpu_connector.kv_layout import KVCacheLayout

_ALIGN = 256


def _round(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class StagingRing:
    """Two device staging buffers and a copy stream per device (see module docstring).

    Args:
        buffer_bytes: minimum size of each buffer in bytes (> 0); a group holds as many whole
            chunks as fit, at least one.

    Raises:
        ValueError: buffer_bytes <= 0.
    """

    def __init__(self, buffer_bytes: int = 32 << 20) -> None:
        if not isinstance(buffer_bytes, int) or buffer_bytes <= 0:
            raise ValueError(f"staging buffer_bytes must be an int > 0, got {buffer_bytes!r}")
        self.buffer_bytes = buffer_bytes
        self._buffers: dict[int, list[torch.Tensor]] = {}
        self._copy_streams: dict[int, torch.cuda.Stream] = {}
        self._free: dict[int, list] = {}  # per device: event after which buffer b is free
        self._turn: dict[int, int] = {}  # per device: the buffer the next group takes

    def _ring(self, device: torch.device, need: int) -> list[torch.Tensor]:
        index = device.index
        ring = self._buffers.get(index)
        if ring is None or ring[0].numel() < need:
            torch.cuda.synchronize(device)  # an old buffer may still be in use by a copy
            self._free.pop(index, None)
            size = max(self.buffer_bytes, need)
            ring = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]
            self._buffers[index] = ring
        return ring

    def copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The copy-engine stream of ``device`` (created on first use)."""
        if device.index not in self._copy_streams:
            self._copy_streams[device.index] = torch.cuda.Stream(device)
        return self._copy_streams[device.index]

    def transfer(
        self,
        kvcaches: Sequence[torch.Tensor],
        layout: KVCacheLayout,
        objs: Sequence[torch.Tensor],
        slot_mapping: torch.Tensor,
        slot_starts: Sequence[int],
        *,
        to_paged: bool,
        kernel_stream: torch.cuda.Stream,
    ) -> list[TransferHandle]:
        """:meth:`enqueue`, then block until the transfer finished (:meth:`StagedTransfer.wait`).

        Returns:
            The kernel handles, already waited for (``saw_padding`` is valid).
        """
        return self.enqueue(kvcaches, layout, objs, slot_mapping, slot_starts,
                            to_paged=to_paged, kernel_stream=kernel_stream).wait()

    def enqueue(
        self,
        kvcaches: Sequence[torch.Tensor],
        layout: KVCacheLayout,
        objs: Sequence[torch.Tensor],
        slot_mapping: torch.Tensor,
        slot_starts: Sequence[int],
        *,
        to_paged: bool,
        kernel_stream: torch.cuda.Stream,
    ) -> "StagedTransfer":
        """Enqueue a whole multi-layer transfer of ``objs`` (KV_2LTD host tensors); no host wait.

        ``kernel_stream`` must already wait for whatever the copy must follow (the compute
        stream); the copy stream is ordered after ``kernel_stream`` at the start. Transfers
        enqueued one after the other share the two buffers in turn (each waits, on the GPU,
        until the buffer it takes is free). Arguments are as for
        ``cupy_kernels.launch_transfer``. The host tensors must stay alive and unread (store) /
        unchanged (retrieve) until :meth:`StagedTransfer.wait` returned.

        Raises:
            ValueError: as ``launch_transfer``.
        """
        device = kvcaches[0].device
        sizes = [_round(t.numel() * t.element_size()) for t in objs]
        ring = self._ring(device, max(sizes, default=0))
        copy = self.copy_stream(device)
        copy.wait_stream(kernel_stream)
        capacity = ring[0].numel()
        groups: list[list[int]] = []
        used = capacity
        for i, size in enumerate(sizes):
            if used + size > capacity:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += size
        handles: list[TransferHandle] = []
        free = self._free.setdefault(device.index, [None, None])  # buffer b free after event
        last_copy = None
        for members in groups:
            b = self._turn.get(device.index, 0)
            self._turn[device.index] = 1 - b
            views, offset = [], 0
            for i in members:
                t = objs[i]
                nbytes = t.numel() * t.element_size()
                views.append(ring[b][offset:offset + nbytes].view(t.dtype).view(t.shape))
                offset += sizes[i]
            starts = [slot_starts[i] for i in members]
            if to_paged:
                with torch.cuda.stream(copy):
                    if free[b] is not None:
                        copy.wait_event(free[b])
                    for i, view in zip(members, views):
                        view.copy_(objs[i], non_blocking=True)
                    filled = copy.record_event()
                kernel_stream.wait_event(filled)
                handles.append(launch_transfer(kvcaches, layout, views, slot_mapping, starts,
                                               to_paged=True, single_layer=False,
                                               stream=kernel_stream))
                free[b] = kernel_stream.record_event()
            else:
                if free[b] is not None:
                    kernel_stream.wait_event(free[b])
                handles.append(launch_transfer(kvcaches, layout, views, slot_mapping, starts,
                                               to_paged=False, single_layer=False,
                                               stream=kernel_stream))
                filled = kernel_stream.record_event()
                with torch.cuda.stream(copy):
                    copy.wait_event(filled)
                    for i, view in zip(members, views):
                        objs[i].copy_(view, non_blocking=True)
                    free[b] = last_copy = copy.record_event()
        return StagedTransfer(handles, last_copy, list(objs))


class StagedTransfer:
    """A transfer :meth:`StagingRing.enqueue` put on the streams."""

    def __init__(self, handles: list[TransferHandle], last_copy, keepalive: list) -> None:
        self.handles = handles
        self._last_copy = last_copy
        self._keepalive = keepalive

    def query(self) -> bool:
        """True when every kernel and copy finished (non-blocking)."""
        return all(h.query() for h in self.handles) and (
            self._last_copy is None or self._last_copy.query())

    def wait(self) -> list[TransferHandle]:
        """Block until every kernel and copy finished; returns the kernel handles.

        Raises:
            ValueError: a kernel's error (see ``TransferHandle.wait``), after everything finished.
        """
        error = None
        for handle in self.handles:
            try:
                handle.wait()
            except ValueError as err:
                error = error or err
        if self._last_copy is not None:
            self._last_copy.synchronize()
        self._keepalive = []
        if error is not None:
            raise error
        return self.handles
