"""ChunkedTokenDatabase: fixed-size chunks named by a chained prefix hash (DESIGN.md §4.1-2)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Optional, Union

import torch

from lmcache.keys import CacheEngineKey
from lmcache.metadata import LMCacheMetadata
from lmcache.token_database.base import (
    TokenDatabase,
    Tokens,
    num_masked_prefix,
    tokens_to_list,
)
from lmcache.token_database.hashing import make_hash_fn, none_hash

TAG_PREFIX = "lmcache.tag."


class ChunkedTokenDatabase(TokenDatabase):
    """Cuts tokens into chunks of ``chunk_size``; chunk i covers ``[i*c, min((i+1)*c, n))``.

    Chain: h_0 = NONE_HASH, h_i = hash((h_{i-1}, tuple(tokens of chunk i), ())) with the
    ``hash_algorithm`` of :mod:`lmcache.token_database.hashing` (LMCache/vLLM compatible).

    Args:
        metadata: names the keys (model, world size, worker id, kv dtype); may be None on a
            process that only needs raw hashes (``make_key=False``).
        chunk_size: tokens per chunk (> 0); must equal ``metadata.chunk_size`` if given.
        hash_algorithm: "sha256_cbor" or "builtin".
        save_unfull_chunk: also yield the trailing partial chunk.
        hash_seed: NONE_HASH seed; None reads ``PYTHONHASHSEED`` (at construction); unset →
            root 0.

    Raises:
        ValueError: bad chunk_size / algorithm, or chunk_size disagrees with metadata.
    """

    def __init__(
        self,
        metadata: Optional[LMCacheMetadata] = None,
        chunk_size: int = 256,
        hash_algorithm: str = "sha256_cbor",
        save_unfull_chunk: bool = False,
        hash_seed: Optional[str] = None,
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if metadata is not None and metadata.chunk_size != chunk_size:
            raise ValueError(
                f"chunk_size {chunk_size} differs from metadata kv_shape chunk size "
                f"{metadata.chunk_size}"
            )
        self.metadata = metadata
        self.chunk_size = chunk_size
        self.hash_algorithm = hash_algorithm
        self.save_unfull_chunk = bool(save_unfull_chunk)
        self._hash = make_hash_fn(hash_algorithm)
        if hash_seed is None:
            hash_seed = os.environ.get("PYTHONHASHSEED")
        self.hash_seed = hash_seed
        self.none_hash = none_hash(hash_algorithm, hash_seed)

    def make_key(self, chunk_hash: int, request_configs: Optional[dict] = None) -> CacheEngineKey:
        """The CacheEngineKey of a chunk hash (tags from ``lmcache.tag.<t>`` configs).

        Raises:
            ValueError: this database has no metadata.
        """
        md = self.metadata
        if md is None:
            raise ValueError("ChunkedTokenDatabase without metadata cannot make keys")
        return CacheEngineKey(
            md.model_name, md.world_size, md.worker_id, chunk_hash, md.kv_dtype,
            _tags(request_configs),
        )

    def process_tokens(
        self,
        tokens: Tokens,
        mask: Optional[torch.Tensor] = None,
        make_key: bool = True,
        request_configs: Optional[dict] = None,
    ) -> Iterator[tuple[int, int, Union[CacheEngineKey, int]]]:
        """See :meth:`TokenDatabase.process_tokens`. Validation happens before the first yield."""
        toks = tokens_to_list(tokens)
        skip = num_masked_prefix(mask, len(toks), self.chunk_size)
        tags = _tags(request_configs)
        if make_key and self.metadata is None:
            raise ValueError("ChunkedTokenDatabase without metadata cannot make keys")
        return self._chunks(toks, skip, make_key, tags)

    def _chunks(self, toks: list[int], skip: int, make_key: bool, tags):
        n, c, hash_fn, parent = len(toks), self.chunk_size, self._hash, self.none_hash
        md = self.metadata
        end_all = n if self.save_unfull_chunk else n - n % c
        for start in range(0, end_all, c):
            end = min(start + c, n)
            parent = hash_fn((parent, tuple(toks[start:end]), ()))
            if start < skip:
                continue
            if make_key:
                yield start, end, CacheEngineKey(
                    md.model_name, md.world_size, md.worker_id, parent, md.kv_dtype, tags
                )
            else:
                yield start, end, parent


def _tags(request_configs: Optional[dict]) -> tuple[tuple[str, str], ...]:
    if not request_configs:
        return ()
    return tuple(sorted(
        (k[len(TAG_PREFIX):], str(v)) for k, v in request_configs.items()
        if isinstance(k, str) and k.startswith(TAG_PREFIX)
    ))
