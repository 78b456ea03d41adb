"""GPUConnectorInterface: moves KV between the serving engine's paged cache and MemoryObjs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from lmcache.memory.memory_obj import MemoryObj


class GPUConnectorInterface(ABC):
    """Moves one chunk's KV between the engine's (GPU or CPU) KV cache and a MemoryObj.

    Keyword arguments shared by every method (as the engine forwards them):
        kvcaches: ``list[torch.Tensor]``, one paged tensor per layer (the layout is the
            connector's injected ``KVCacheLayout``).
        slot_mapping: ``torch.Tensor`` of int64 (int32 accepted), the flat slots
            (block_id * block_size + offset) of the full token sequence; -1 = padding.
        offset: int, default 0: leading tokens of the sequence not covered by
            ``slot_mapping`` (token i uses ``slot_mapping[i - offset]``).
    """

    @abstractmethod
    def from_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs) -> None:
        """Copy the KV of tokens ``[start, end)`` out of the paged cache into ``memory_obj``."""

    @abstractmethod
    def to_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs) -> None:
        """Copy ``memory_obj`` (tokens ``[start, end)``) into the paged cache."""

    @abstractmethod
    def get_shape(self, num_tokens: int) -> torch.Size:
        """Shape of the MemoryObj that holds ``num_tokens`` tokens of every layer."""

    def batched_from_gpu(
        self, memory_objs: Sequence[MemoryObj], starts: Sequence[int], ends: Sequence[int],
        **kwargs,
    ) -> None:
        """``from_gpu`` for several chunks (same kwargs). ValueError on unequal lengths."""
        _check_batch(memory_objs, starts, ends)
        for obj, start, end in zip(memory_objs, starts, ends):
            self.from_gpu(obj, start, end, **kwargs)

    def batched_to_gpu(
        self, memory_objs: Sequence[MemoryObj], starts: Sequence[int], ends: Sequence[int],
        **kwargs,
    ) -> None:
        """``to_gpu`` for several chunks (same kwargs). ValueError on unequal lengths."""
        _check_batch(memory_objs, starts, ends)
        for obj, start, end in zip(memory_objs, starts, ends):
            self.to_gpu(obj, start, end, **kwargs)

    def validate_kvcaches(self, kvcaches: object) -> None:
        """Check the ``kvcaches`` kwarg before any memory is allocated for it.

        This base check requires a non-empty list/tuple of torch.Tensors on one device;
        connectors that know their layout check shapes and dtypes too.

        Raises:
            TypeError / ValueError: naming what was given and what was expected.
        """
        if not isinstance(kvcaches, (list, tuple)) or not kvcaches:
            raise TypeError(
                f"kvcaches must be a non-empty list of torch.Tensor (one per layer), "
                f"got {type(kvcaches).__name__}"
            )
        for i, t in enumerate(kvcaches):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"kvcaches[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.device != kvcaches[0].device:
                raise ValueError(
                    f"kvcaches[{i}] is on {t.device}, kvcaches[0] on {kvcaches[0].device}"
                )


def _check_batch(memory_objs: Sequence, starts: Sequence[int], ends: Sequence[int]) -> None:
    if not len(memory_objs) == len(starts) == len(ends):
        raise ValueError(
            f"batched transfer needs equal lengths, got {len(memory_objs)} objects, "
            f"{len(starts)} starts, {len(ends)} ends"
        )
