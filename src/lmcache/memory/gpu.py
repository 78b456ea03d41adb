"""GPUMemoryAllocator: the CPU allocator's first-fit buffer, in GPU memory (``allocator=gpu``)."""

from __future__ import annotations

from typing import Union

import torch

from lmcache.memory.cpu import CPUMemoryAllocator


class GPUMemoryAllocator(CPUMemoryAllocator):
    """:class:`CPUMemoryAllocator` (one preallocated uint8 buffer, first fit, same API) whose
    buffer lies on a CUDA device, so every MemoryObj it hands out is a CUDA tensor.

    What it is for: the tier memory of the P2P tier over CUDA IPC — ``allocator=gpu
    transfer_channel=cuda_ipc deployment=p2p``: the channel registers this buffer as its region
    0, so instances on one host pull chunks GPU to GPU (no host round trip). Only the CPU
    tier (LocalCPUBackend) and the P2P tier are tested on it; tiers that serialize objects to
    disk or a remote store expect host memory.

    Args:
        size_bytes: buffer size in bytes, > 0 (``max_local_cpu_size`` GiB in the config).
        device: a CUDA device (``"cuda"``, ``"cuda:1"`` or a torch.device).
        alignment: power of two >= 16.

    Raises:
        ValueError: device is not a CUDA device; bad size or alignment.
        RuntimeError: CUDA is not available.
    """

    def __init__(self, size_bytes: int, device: Union[str, torch.device] = "cuda",
                 alignment: int = 256):
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be a CUDA device such as 'cuda:0', got {device!r}") from e
        if dev.type != "cuda":
            raise ValueError(f"device must be a CUDA device such as 'cuda:0', got {device!r}")
        if not torch.cuda.is_available():
            raise RuntimeError(f"allocator=gpu needs CUDA (device {device!r}); it is not available")
        self.device = dev
        super().__init__(size_bytes, pin_memory=False, alignment=alignment)

    def _new_buffer(self, size_bytes: int) -> torch.Tensor:
        return torch.empty(size_bytes, dtype=torch.uint8, device=self.device)
