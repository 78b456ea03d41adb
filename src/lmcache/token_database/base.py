"""TokenDatabase: turns a token sequence into (start, end, key) chunks."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import torch

from lmcache.keys import CacheEngineKey

Tokens = Union[torch.Tensor, Sequence[int]]


class TokenDatabase(abc.ABC):
    """Abstract token database (ChunkedTokenDatabase, SegmentTokenDatabase...)."""

    @abc.abstractmethod
    def process_tokens(
        self,
        tokens: Tokens,
        mask: Optional[torch.Tensor] = None,
        make_key: bool = True,
        request_configs: Optional[dict] = None,
    ) -> Iterator[tuple[int, int, Union[CacheEngineKey, int]]]:
        """Yield ``(start, end, key)`` for each chunk to process, in token order.

        Args:
            tokens: 1-D int tensor (any device) or sequence of ints.
            mask: 1-D bool tensor of the same length, False prefix then True (store_mask /
                token_mask); the False prefix must be a multiple of chunk_size. Chunks inside
                the False prefix are hashed (they are part of the chain) but not yielded.
            make_key: yield CacheEngineKeys when True, raw int chunk hashes when False.
            request_configs: per-request configs; ``lmcache.tag.<t>`` entries become key tags.

        Raises:
            ValueError: bad mask (wrong length, not a False-prefix mask, prefix not a
                multiple of chunk_size) or bad tokens.
        """


def tokens_to_list(tokens: Tokens) -> list[int]:
    """Tokens as a Python list of ints (one ``tolist()`` for a tensor).

    Raises:
        ValueError: a tensor that is not 1-D or not an integer dtype.
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
        return tokens.tolist()
    return [int(t) for t in tokens]


def num_masked_prefix(mask: Optional[torch.Tensor], num_tokens: int, chunk_size: int) -> int:
    """Length of the mask's False prefix (0 without a mask), validated.

    Raises:
        TypeError: mask is not a bool tensor.
        ValueError: length differs from ``num_tokens``, a False follows a True, or the False
            count is not a multiple of ``chunk_size`` (the message names both numbers).
    """
    if mask is None:
        return 0
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.dim() != 1 or mask.numel() != num_tokens:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but there are {num_tokens} tokens"
        )
    num_true = int(mask.sum())
    num_false = num_tokens - num_true
    if num_false and (bool(mask[:num_false].any()) or not bool(mask[num_false:].all())):
        raise ValueError("mask must be a False prefix followed only by True values")
    if num_false % chunk_size:
        raise ValueError(
            f"mask's False prefix has {num_false} tokens, not a multiple of chunk_size "
            f"{chunk_size}"
        )
    return num_false
