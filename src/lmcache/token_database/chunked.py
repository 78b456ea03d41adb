"""ChunkedTokenDatabase: fixed-size chunks named by a chained prefix hash (DESIGN.md §4.1-2)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch

from lmcache.keys import CacheEngineKey
from lmcache.metadata import LMCacheMetadata
from lmcache.token_database.base import (
    TokenDatabase,
    Tokens,
    num_masked_prefix,
    tokens_to_list,
)
from lmcache.token_database.hashing import (
    make_hash_fn,
    none_hash,
    random_root_in_lmcache,
    resolve_seed,
)

logger = logging.getLogger(__name__)

TAG_PREFIX = "lmcache.tag."
# request_configs entries the vLLM connector sets (never taken from user input) that vLLM's block
# hash depends on; they enter the chain as extra keys, as in vLLM's generate_block_hash_extra_keys.
CACHE_SALT = "vllm.cache_salt"
LORA_NAME = "vllm.lora_name"
LORA_PATH = "vllm.lora_path"


class ChunkedTokenDatabase(TokenDatabase):
    """Cuts tokens into chunks of ``chunk_size``; chunk i covers ``[i*c, min((i+1)*c, n))``.

    Chain: h_0 = NONE_HASH, h_i = hash((h_{i-1}, tuple(tokens of chunk i), extra_i)) with the
    ``hash_algorithm`` of :mod:`lmcache.token_database.hashing` (LMCache/vLLM compatible; NONE_HASH
    as vLLM's ``init_none_hash`` seeds it). ``extra_i`` is ``()`` — as in LMCache — unless the
    request carries what vLLM's block hash also depends on: ``("lora", name, path)`` on every chunk
    (``vllm.lora_name``/``vllm.lora_path`` request configs) and ``("cache_salt", salt)`` on chunk 0
    (``vllm.cache_salt``), in vLLM's order. Such chunks never share a key with plain ones.

    Args:
        metadata: names the keys (model, world size, worker id, kv dtype); may be None on a
            process that only needs raw hashes (``make_key=False``).
        chunk_size: tokens per chunk (> 0); must equal ``metadata.chunk_size`` if given.
        hash_algorithm: one of :data:`lmcache.token_database.hashing.HASH_ALGORITHMS`.
        save_unfull_chunk: also yield the trailing partial chunk.
        hash_seed: NONE_HASH seed string; None reads ``PYTHONHASHSEED`` (at construction).
        save_only_first_rank: MLA KV is the same on every tensor-parallel rank, so its keys carry
            world_size 1 and worker_id 0 on every rank (LMCache's keys with
            ``save_only_first_rank``): a TP=2 and a TP=1 instance name a chunk alike. None → on
            for MLA metadata. Ignored without MLA (as in LMCache).

    Raises:
        ValueError: bad chunk_size / algorithm / seed, or chunk_size disagrees with metadata.
    """

    def __init__(
        self,
        metadata: Optional[LMCacheMetadata] = None,
        chunk_size: int = 256,
        hash_algorithm: str = "sha256_cbor",
        save_unfull_chunk: bool = False,
        hash_seed: Optional[str] = None,
        save_only_first_rank: Optional[bool] = None,
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
        self.hash_seed = resolve_seed(hash_seed)
        self.none_hash = none_hash(hash_algorithm, self.hash_seed)
        use_mla = metadata is not None and metadata.use_mla
        self.save_only_first_rank = use_mla and (
            True if save_only_first_rank is None else bool(save_only_first_rank))
        if metadata is not None:
            first = self.save_only_first_rank
            self._key_ws = 1 if first else metadata.world_size
            self._key_wid = 0 if first else metadata.worker_id
        if random_root_in_lmcache(hash_algorithm, self.hash_seed):
            logger.warning(
                "hash_algorithm %s without hash_seed or PYTHONHASHSEED: LMCache's NONE_HASH is "
                "random per process there; lmcache uses the deterministic root %d, so keys repeat "
                "across restarts but cannot match LMCache's (set PYTHONHASHSEED on both for that)",
                hash_algorithm, self.none_hash)

    def make_key(self, chunk_hash: int, request_configs: Optional[dict] = None) -> CacheEngineKey:
        """The CacheEngineKey of a chunk hash (tags from ``lmcache.tag.<t>`` configs).

        Raises:
            ValueError: this database has no metadata.
        """
        md = self.metadata
        if md is None:
            raise ValueError("ChunkedTokenDatabase without metadata cannot make keys")
        return CacheEngineKey(md.model_name, self._key_ws, self._key_wid, chunk_hash, md.kv_dtype,
                              _tags(request_configs))

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
        extras = _extras(request_configs)
        if make_key and self.metadata is None:
            raise ValueError("ChunkedTokenDatabase without metadata cannot make keys")
        return self._chunks(toks, skip, make_key, tags, extras)

    def _chunks(self, toks: list[int], skip: int, make_key: bool, tags, extras):
        n, c, hash_fn, parent = len(toks), self.chunk_size, self._hash, self.none_hash
        every, first = extras
        md = self.metadata
        end_all = n if self.save_unfull_chunk else n - n % c
        for start in range(0, end_all, c):
            end = min(start + c, n)
            extra = every + first if start == 0 else every
            parent = hash_fn((parent, tuple(toks[start:end]), extra))
            if start < skip:
                continue
            if make_key:
                yield start, end, CacheEngineKey(
                    md.model_name, self._key_ws, self._key_wid, parent, md.kv_dtype, tags
                )
            else:
                yield start, end, parent


def _tags(request_configs: Optional[dict]) -> tuple[tuple[str, str], ...]:
    """``lmcache.tag.<t>`` entries as ``((t, str(value)), ...)`` in insertion order (LMCache's)."""
    if not request_configs:
        return ()
    return tuple(
        (k[len(TAG_PREFIX):], str(v)) for k, v in request_configs.items()
        if isinstance(k, str) and k.startswith(TAG_PREFIX)
    )


def _extras(request_configs: Optional[dict]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(extra keys of every chunk, extra keys of chunk 0 only), vLLM's order (lora, cache_salt).

    Raises:
        ValueError: a LoRA path without a name.
    """
    if not request_configs:
        return (), ()
    lora_name, lora_path = request_configs.get(LORA_NAME), request_configs.get(LORA_PATH)
    if lora_path is not None and not lora_name:
        raise ValueError(f"request config {LORA_PATH}={lora_path!r} without {LORA_NAME}")
    every = (("lora", str(lora_name), str(lora_path or "")),) if lora_name else ()
    salt = request_configs.get(CACHE_SALT)
    first = (("cache_salt", str(salt)),) if salt else ()
    return every, first
