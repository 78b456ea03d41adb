"""ChunkedTokenDatabase: fixed-size chunks named by a chained prefix hash (DESIGN.md §4.1-2)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
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
from lmcache.token_database.cbor_chain import CborTokens
from lmcache.token_database.token_array import ints_to_numpy
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
        request_cache_tokens: tokens (over all requests) whose chunk hashes are kept for calls
            that pass a ``request_id`` (least recently used requests are dropped first); 0 turns
            the cache off.

    Request cache: a call with ``request_id`` reuses the hashes of that request's earlier calls
    (lookup, retrieve, store of the same prompt hash it once): the tokens are compared with the
    cached ones (one tensor comparison), the chain is resumed after the longest matching cached
    prefix of whole chunks, and only new chunks are hashed. A request whose tokens changed is
    hashed again. ``num_hashed_chunks`` counts every chunk hash computed (a metric and for tests).

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
        request_cache_tokens: int = 1 << 21,
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if metadata is not None and metadata.chunk_size != chunk_size:
            raise ValueError(
                f"chunk_size {chunk_size} differs from metadata kv_shape chunk size "
                f"{metadata.chunk_size}"
            )
        if isinstance(request_cache_tokens, bool) or not isinstance(request_cache_tokens, int) \
                or request_cache_tokens < 0:
            raise ValueError(f"request_cache_tokens must be an int >= 0, got {request_cache_tokens!r}")
        self.metadata = metadata
        self.chunk_size = chunk_size
        self.request_cache_tokens = request_cache_tokens
        self._requests: OrderedDict[Hashable, _Chain] = OrderedDict()
        self._cached_tokens = 0
        self._cache_lock = threading.Lock()
        self.num_hashed_chunks = 0
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
        request_id: Optional[Hashable] = None,
    ) -> Iterator[tuple[int, int, Union[CacheEngineKey, int]]]:
        """See :meth:`TokenDatabase.process_tokens`. Validation happens before the first yield.

        Lazy: chunks are hashed in growing blocks (4, 8, ... 64 chunks) as the iterator is
        consumed, so a consumer can start on the first chunks while later ones are hashed.
        ``request_id``: reuse (and extend) that request's cached chunk hashes (class docstring).
        """
        tags = _tags(request_configs)
        extras = _extras(request_configs)
        if make_key and self.metadata is None:
            raise ValueError("ChunkedTokenDatabase without metadata cannot make keys")
        toks = _as_tensor(tokens)
        skip = num_masked_prefix(mask, toks.numel(), self.chunk_size)
        return self._chunks(toks, skip, make_key, tags, extras, request_id)

    def forget(self, request_id: Hashable) -> None:
        """Drop the cached chunk hashes of ``request_id`` (unknown ids are ignored)."""
        with self._cache_lock:
            chain = self._requests.pop(request_id, None)
            if chain is not None:
                self._cached_tokens -= chain.tokens.numel()

    # ---- hashing ------------------------------------------------------------------------
    def _chunks(self, toks, skip, make_key, tags, extras, request_id):
        n, c = toks.numel(), self.chunk_size
        index = 0
        for block in self._hash_blocks(toks, extras, request_id):
            first = max(0, skip // c - index)
            todo = block[first:]
            base = index + first
            index += len(block)
            if not todo:
                continue
            items = self._keys(todo, tags) if make_key else todo
            for i, item in enumerate(items, base):
                yield i * c, min(i * c + c, n), item

    def _hash_blocks(self, toks: torch.Tensor, extras, request_id) -> Iterator[list[int]]:
        """Chain hashes of every chunk of ``toks`` (the trailing partial one when
        save_unfull_chunk), in blocks, reusing and extending ``request_id``'s cache."""
        n, c = toks.numel(), self.chunk_size
        full = n - n % c
        chain = None
        if request_id is not None and self.request_cache_tokens:
            chain = self._resume(toks, full, extras, request_id)
            hashes = list(chain.hashes)
            if hashes:
                yield hashes
            have = len(hashes) * c
        else:
            hashes, have = [], 0
        parent = hashes[-1] if hashes else self.none_hash
        size = 4
        enc = self._encoded(toks, have, extras)
        while have < full:
            stop = min(full, have + size * c)
            block = self._chain(toks, have, stop, parent, extras, enc)
            if chain is not None:
                chain.hashes.extend(block)
            parent, have = block[-1], stop
            size = min(64, size * 2)
            yield block
        if self.save_unfull_chunk and full < n:
            yield self._chain(toks, full, n, parent, extras, enc)

    def _resume(self, toks: torch.Tensor, full: int, extras, request_id) -> "_Chain":
        """The cache entry for ``toks[:full]``: the request's cached hashes of the longest equal
        prefix of whole chunks, to be extended by the caller (it becomes the request's entry)."""
        c = self.chunk_size
        with self._cache_lock:
            old = self._requests.pop(request_id, None)
            if old is not None:
                self._cached_tokens -= old.tokens.numel()
        known: list[int] = []
        if old is not None and old.extras == extras:
            have = min(len(old.hashes) * c, old.tokens.numel(), full)
            same = old.tokens[:have] == toks[:have]
            if not bool(same.all()):
                have = int((~same).nonzero()[0, 0]) // c * c
            known = old.hashes[:have // c]
            if have == full:  # all known: the (maybe longer) cached chain stays as it is
                with self._cache_lock:
                    self._requests[request_id] = old
                    self._cached_tokens += old.tokens.numel()
                return _Chain(old.tokens, known, extras)  # detached: nothing to extend
        chain = _Chain(toks[:full].clone(), known, extras)  # the caller may change its tensor
        with self._cache_lock:
            self._requests[request_id] = chain
            self._cached_tokens += full
            while self._cached_tokens > self.request_cache_tokens and self._requests:
                _, dropped = self._requests.popitem(last=False)
                self._cached_tokens -= dropped.tokens.numel()
        return chain

    def _encoded(self, toks: torch.Tensor, start: int, extras):
        """``toks[start:]`` CBOR-encoded once (None: extra keys or another algorithm)."""
        if extras[0] or extras[1] or start >= toks.numel():
            return None
        return (start, CborTokens.build(self.hash_algorithm, toks[start:], self.chunk_size))

    def _chain(self, toks: torch.Tensor, start: int, end: int, parent: int, extras,
               enc=None) -> list[int]:
        """Hashes of the chunks of ``toks[start:end]`` (start a chunk boundary) after ``parent``;
        ``enc``: :meth:`_encoded` of a range that begins at or before ``start``."""
        if end <= start:
            return []
        n_chunks = -(-(end - start) // self.chunk_size)
        self.num_hashed_chunks += n_chunks
        if enc is not None and enc[1] is not None and enc[0] <= start:
            return enc[1].chain(parent, start - enc[0], end - enc[0])
        every, first = extras
        hash_fn, c = self._hash, self.chunk_size
        values = toks[start:end].tolist()
        out = []
        for b in range(0, end - start, c):
            extra = every + first if start + b == 0 else every
            parent = hash_fn((parent, tuple(values[b:b + c]), extra))
            out.append(parent)
        return out

    def _keys(self, hashes: list[int], tags) -> list[CacheEngineKey]:
        """CacheEngineKeys of ``hashes``: one validated template key, copied per chunk."""
        if not hashes:
            return []
        md = self.metadata
        template = CacheEngineKey(md.model_name, self._key_ws, self._key_wid, hashes[0],
                                  md.kv_dtype, tags)
        fields = template.__dict__
        new = object.__new__
        out = [template]
        for h in hashes[1:]:
            key = new(CacheEngineKey)
            key.__dict__.update(fields)
            key.__dict__["chunk_hash"] = h
            out.append(key)
        return out


class _Chain:
    """One request's cached chain: tokens of its whole chunks, their hashes, the extra keys."""

    __slots__ = ("tokens", "hashes", "extras")

    def __init__(self, tokens: torch.Tensor, hashes: list[int], extras) -> None:
        self.tokens, self.hashes, self.extras = tokens, hashes, extras


def _as_tensor(tokens: Tokens) -> torch.Tensor:
    """Tokens as a 1-D int64 CPU tensor (validated like ``tokens_to_list``).

    Raises:
        ValueError: a tensor that is not 1-D or not an integer dtype; a sequence of non-ints.
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
        tokens_to_list(tokens[:0])  # validates the dtype
        return tokens.to(device="cpu", dtype=torch.int64)
    try:
        if isinstance(tokens, (list, tuple)):  # one C loop (numpy) instead of int() per token
            return torch.from_numpy(ints_to_numpy(tokens))
        return torch.tensor(tokens_to_list(tokens), dtype=torch.int64)
    except (TypeError, RuntimeError, OverflowError) as err:
        raise ValueError(f"tokens must be a sequence of ints: {err}") from None


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
