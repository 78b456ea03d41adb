"""LMCacheMetadata: runtime facts injected from the serving engine (never from YAML)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcache.keys import check_worker

_ROLES = ("worker", "scheduler")


@dataclass(frozen=True)
class LMCacheMetadata:
    """Runtime facts of one lmcache process.

    Attributes:
        model_name: serving engine's model name.
        world_size: tensor-parallel world size, >= 1.
        worker_id: this process's rank, 0 <= worker_id < world_size.
        kv_dtype: dtype of the KV cache (e.g. ``torch.bfloat16``).
        kv_shape: ``(num_layers, 2 (1 if MLA), chunk_size, num_kv_heads, head_size)`` —
            LMCache's order; num_kv_heads is this rank's head count (for MLA: 1, and
            head_size is the latent width kv_lora_rank + rope_dim).
        use_mla: MLA model (one latent KV instead of separate K and V).
        role: ``"worker"`` or ``"scheduler"``.

    Raises:
        ValueError / TypeError: a field is out of range (the message names it).
    """

    model_name: str
    world_size: int
    worker_id: int
    kv_dtype: torch.dtype
    kv_shape: tuple[int, int, int, int, int]
    use_mla: bool = False
    role: str = "worker"

    def __post_init__(self) -> None:
        check_worker(self.model_name, self.world_size, self.worker_id)
        if not isinstance(self.kv_dtype, torch.dtype):
            raise TypeError(f"kv_dtype must be a torch.dtype, got {self.kv_dtype!r}")
        shape = tuple(self.kv_shape) if isinstance(self.kv_shape, (tuple, list)) else None
        if shape is None or len(shape) != 5 or not all(_is_int(d) and d >= 1 for d in shape):
            raise ValueError(
                f"kv_shape must be 5 positive ints (num_layers, 2|1, chunk_size, "
                f"num_kv_heads, head_size), got {self.kv_shape!r}"
            )
        object.__setattr__(self, "kv_shape", shape)
        want_kv = 1 if self.use_mla else 2
        if shape[1] != want_kv:
            raise ValueError(
                f"kv_shape[1] must be {want_kv} when use_mla={self.use_mla}, got {shape[1]}"
            )
        if self.role not in _ROLES:
            raise ValueError(f"role must be one of {_ROLES}, got {self.role!r}")

    @property
    def num_layers(self) -> int:
        """Number of attention layers (kv_shape[0])."""
        return self.kv_shape[0]

    @property
    def chunk_size(self) -> int:
        """Tokens per chunk (kv_shape[2])."""
        return self.kv_shape[2]

    @property
    def num_kv_heads(self) -> int:
        """KV heads of this rank (kv_shape[3])."""
        return self.kv_shape[3]

    @property
    def head_size(self) -> int:
        """Elements per head (kv_shape[4])."""
        return self.kv_shape[4]

    @property
    def hidden_dim(self) -> int:
        """num_kv_heads * head_size: the D of MemoryFormat shapes."""
        return self.kv_shape[3] * self.kv_shape[4]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
