"""SegmentTokenDatabase: segments between separator tokens, keyed independently of position.

CacheBlend's token database (LMCache's ``SegmentTokenDatabase``): a prompt is a sequence of
segments (system prompt, documents, question) joined by the tokens of ``blend_special_str``.
Each segment is keyed by the hash of its own tokens only, so the same document hits wherever it
sits in a prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Optional, Union

import torch

from lmcache.keys import CacheEngineKey
from lmcache.metadata import LMCacheMetadata
from lmcache.token_database.base import TokenDatabase, Tokens, num_masked_prefix, tokens_to_list
from lmcache.token_database.chunked import _extras, _tags
from lmcache.token_database.hashing import (
    make_hash_fn,
    none_hash,
    random_root_in_lmcache,
    resolve_seed,
)

logger = logging.getLogger(__name__)

DEFAULT_BLEND_SPECIAL_STR = " # # "


class SegmentTokenDatabase(TokenDatabase):
    """Splits tokens at each occurrence of the separator tokens; one key per segment.

    Separator: the token ids of ``blend_special_str`` — given as ``separator_tokens``, or
    computed as ``tokenizer(blend_special_str)``, or (neither given) as LMCache does from the
    model's own tokenizer: ``AutoTokenizer.from_pretrained(metadata.model_name)`` encoding
    ``blend_special_str`` without special tokens (LMCache drops the first id of
    ``encode(blend_special_str)``, which is the same for tokenizers that prepend one BOS).
    Note that BPE tokenizers may merge a separator's edge with neighbouring text, so prompts
    should be built by joining token lists with the separator ids (as LMCache's examples do).

    Splitting (LMCache's rule): occurrences are found left to right without overlap; segment i
    covers the tokens between separator i-1 and separator i, separators excluded; the last
    segment runs to the end of the tokens (it is yielded even if partial: segments have no
    size). Differences from LMCache: empty segments (a separator at the start, at the end or
    twice in a row) are not yielded (LMCache yields a key for zero tokens), and overlapping
    separator matches are resolved left to right (LMCache yields garbage spans there).

    Key of a segment: ``hash((NONE_HASH, tuple(segment tokens), extra))`` with the
    ``hash_algorithm`` and NONE_HASH rules of :mod:`lmcache.token_database.hashing` (as
    ChunkedTokenDatabase's first chunk, hence LMCache's segment hashes); ``extra`` is ``()``
    unless the request carries LoRA or a cache salt (``vllm.lora_*``/``vllm.cache_salt``
    request configs), which then enter every segment's hash (a salted segment never shares a
    key with a plain one). Tags come from ``lmcache.tag.<t>`` request configs.

    Mask (LMCache's rule): a False prefix of ``n`` tokens skips every segment whose start is
    before ``n`` (such a segment is not yielded even if it extends past ``n``).

    Args:
        metadata: names the keys; may be None when only raw hashes (``make_key=False``) are
            needed and ``separator_tokens`` or ``tokenizer`` is given.
        blend_special_str: the separator text (LMCache's ``blend_special_str``).
        separator_tokens: the separator's token ids; overrides ``blend_special_str``.
        tokenizer: callable ``str -> sequence of int`` used when ``separator_tokens`` is None.
        hash_algorithm: one of :data:`lmcache.token_database.hashing.HASH_ALGORITHMS`.
        hash_seed: NONE_HASH seed string; None reads ``PYTHONHASHSEED`` (at construction).
        save_only_first_rank: as ChunkedTokenDatabase (MLA keys carry world_size 1, worker 0).

    Raises:
        ValueError: empty or non-int separator tokens, an empty ``blend_special_str``, bad
            hash algorithm/seed, or no way to get the separator (no tokens, tokenizer or
            metadata).
    """

    def __init__(
        self,
        metadata: Optional[LMCacheMetadata] = None,
        blend_special_str: str = DEFAULT_BLEND_SPECIAL_STR,
        separator_tokens: Optional[Sequence[int]] = None,
        tokenizer: Optional[Callable[[str], Sequence[int]]] = None,
        hash_algorithm: str = "sha256_cbor",
        hash_seed: Optional[str] = None,
        save_only_first_rank: Optional[bool] = None,
    ) -> None:
        self.metadata = metadata
        self.blend_special_str = blend_special_str
        if separator_tokens is None:
            if not isinstance(blend_special_str, str) or not blend_special_str:
                raise ValueError(
                    f"blend_special_str must be a non-empty str, got {blend_special_str!r}")
            if tokenizer is None:
                tokenizer = _model_tokenizer(metadata)
            separator_tokens = tokenizer(blend_special_str)
        self.sep_tokens = _check_separator(separator_tokens, blend_special_str)
        self.sep_len = len(self.sep_tokens)
        self.hash_algorithm = hash_algorithm
        self._hash = make_hash_fn(hash_algorithm)
        self.hash_seed = resolve_seed(hash_seed)
        self.none_hash = none_hash(hash_algorithm, self.hash_seed)
        use_mla = metadata is not None and metadata.use_mla
        self.save_only_first_rank = use_mla and (
            True if save_only_first_rank is None else bool(save_only_first_rank))
        if metadata is not None:
            self._key_ws = 1 if self.save_only_first_rank else metadata.world_size
            self._key_wid = 0 if self.save_only_first_rank else metadata.worker_id
        if random_root_in_lmcache(hash_algorithm, self.hash_seed):
            logger.warning(
                "hash_algorithm %s without hash_seed or PYTHONHASHSEED: lmcache uses the "
                "deterministic root %d, which cannot match LMCache's random one",
                hash_algorithm, self.none_hash)

    def split(self, tokens: Tokens) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` of the non-empty segments of ``tokens``, in order.

        Raises:
            ValueError: tokens not a 1-D int tensor / sequence of ints.
        """
        return _split(tokens_to_list(tokens), self.sep_tokens)

    def segment_hash(self, segment: Tokens, extra: tuple = ()) -> int:
        """Hash of one segment's tokens: ``hash((NONE_HASH, tuple(tokens), extra))``."""
        return self._hash((self.none_hash, tuple(tokens_to_list(segment)), extra))

    def process_tokens(
        self,
        tokens: Tokens,
        mask: Optional[torch.Tensor] = None,
        make_key: bool = True,
        request_configs: Optional[dict] = None,
    ) -> Iterator[tuple[int, int, Union[CacheEngineKey, int]]]:
        """See :meth:`TokenDatabase.process_tokens`; yields one entry per non-empty segment.
        The mask's False prefix may have any length here (no chunk_size). Validation happens
        before the first yield.

        Raises:
            ValueError: bad tokens or mask; ``make_key`` without metadata; a LoRA path
                without a name.
        """
        toks = tokens_to_list(tokens)
        skip = num_masked_prefix(mask, len(toks), 1)
        tags = _tags(request_configs)
        every, first = _extras(request_configs)
        extra = every + first
        if make_key and self.metadata is None:
            raise ValueError("SegmentTokenDatabase without metadata cannot make keys")
        spans = [(s, e) for s, e in _split(toks, self.sep_tokens) if s >= skip]
        return self._segments(toks, spans, extra, make_key, tags)

    def _segments(self, toks, spans, extra, make_key, tags):
        md = self.metadata
        for start, end in spans:
            h = self._hash((self.none_hash, tuple(toks[start:end]), extra))
            if make_key:
                yield start, end, CacheEngineKey(md.model_name, self._key_ws, self._key_wid, h,
                                                 md.kv_dtype, tags)
            else:
                yield start, end, h


def _split(toks: list[int], sep: tuple[int, ...]) -> list[tuple[int, int]]:
    n, k = len(toks), len(sep)
    spans, start, i = [], 0, 0
    first = sep[0]
    while i <= n - k:
        if toks[i] == first and tuple(toks[i:i + k]) == sep:
            if i > start:
                spans.append((start, i))
            i += k
            start = i
        else:
            i += 1
    if n > start:
        spans.append((start, n))
    return spans


def _check_separator(tokens, text) -> tuple[int, ...]:
    try:
        out = tuple(tokens_to_list(tokens))
    except (TypeError, ValueError) as err:
        raise ValueError(f"separator tokens of {text!r} must be ints, got {tokens!r}") from err
    if not out:
        raise ValueError(f"separator {text!r} has no tokens; expected at least one token id")
    if any(t < 0 for t in out):
        raise ValueError(f"separator tokens of {text!r} must be >= 0, got {list(out)}")
    return out


def _model_tokenizer(metadata: Optional[LMCacheMetadata]) -> Callable[[str], Sequence[int]]:
    if metadata is None:
        raise ValueError("SegmentTokenDatabase needs separator_tokens, a tokenizer or metadata "
                         "(whose model_name names the tokenizer)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(metadata.model_name)
    return lambda text: tok.encode(text, add_special_tokens=False)
