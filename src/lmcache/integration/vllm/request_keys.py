"""What a request's KV depends on beyond its token ids, as vLLM 0.32's block hash sees it
(``vllm/v1/core/kv_cache_utils.py``: ``generate_block_hash_extra_keys``), carried into lmcache's
chunk keys — so two requests share a chunk only when vLLM's own prefix cache would let them.

* ``cache_salt`` → request config ``vllm.cache_salt``: extra key ``("cache_salt", salt)`` of chunk 0
  (vLLM: of block 0), so the whole chain differs.
* LoRA adapter → ``vllm.lora_name`` / ``vllm.lora_path``: extra key ``("lora", name, path)`` of
  every chunk (vLLM's).
* multimodal inputs → their placeholder tokens are replaced, before hashing, by values derived from
  each item's ``mm_hash`` identifier, as LMCache 0.5.6 does (``apply_mm_hashes_to_token_ids``):
  position i of an item gets the 31 low bits of big-endian 4-byte word (i mod 8) of
  ``sha256(sha256(identifier) ‖ (i div 8) as 8 big-endian bytes)``. Keys of multimodal prompts are
  thus LMCache's; the KV itself is never changed (only the hash input).
* prompt embeddings and pipeline parallelism are refused at start (:func:`check_supported`): the
  KV of prompt embeddings is not named by token ids, and a pipeline stage holds only its layers.

The ``vllm.*`` request configs are set here only; user-given ``kv_transfer_params`` contribute only
``lmcache.*`` entries (tags), so a request cannot claim another's salt or adapter by parameters.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from lmcache.token_database.chunked import CACHE_SALT, LORA_NAME, LORA_PATH

_MM_VALUE_MASK = (1 << 31) - 1


@functools.lru_cache(maxsize=256)
def mm_token_values(identifier: str, length: int) -> tuple[int, ...]:
    """``length`` pseudo token ids in [0, 2**31) for a multimodal item (LMCache's derivation; a
    prefix of a longer span's values).

    Raises:
        ValueError: ``length`` < 0.
    """
    if length < 0:
        raise ValueError(f"multimodal span length must be >= 0, got {length}")
    seed = hashlib.sha256(str(identifier).encode("utf-8")).digest()
    out: list[int] = []
    for block in range((length + 7) // 8):
        digest = hashlib.sha256(seed + block.to_bytes(8, "big")).digest()
        out.extend(int.from_bytes(digest[i:i + 4], "big") & _MM_VALUE_MASK for i in range(0, 32, 4))
    return tuple(out[:length])


def _mm_items(request) -> list[tuple[str, int, int]]:
    """(identifier, offset, length) of each multimodal item (``mm_features``; legacy
    ``mm_hashes``/``mm_positions``)."""
    features = getattr(request, "mm_features", None)
    if features:
        return [(f.identifier, int(f.mm_position.offset), int(f.mm_position.length)) for f in features]
    hashes = getattr(request, "mm_hashes", None)
    if hashes:
        return [(h, int(p.offset), int(p.length)) for h, p in zip(hashes, request.mm_positions)]
    return []


def hash_tokens(request, tokens: list[int] | None = None) -> list[int]:
    """The token ids lmcache hashes for ``request``: ``tokens`` (default ``request.all_token_ids``)
    with multimodal placeholder spans replaced (a copy; spans past the end are cut)."""
    toks = list(request.all_token_ids if tokens is None else tokens)
    n = len(toks)
    for identifier, offset, length in _mm_items(request):
        if offset >= n:
            continue
        end = min(offset + length, n)
        toks[offset:end] = mm_token_values(identifier, end - offset)
    return toks


def request_configs(request) -> dict[str, Any] | None:
    """``lmcache.*`` entries of a request's kv_transfer_params (tags such as ``lmcache.tag.user``),
    plus the ``vllm.*`` entries of what its KV depends on (cache_salt, LoRA adapter)."""
    params = getattr(request, "kv_transfer_params", None) or {}
    sp = getattr(request, "sampling_params", None)
    extra = getattr(sp, "extra_args", None) or {}
    params = {**(extra.get("kv_transfer_params") or {}), **params}
    out: dict[str, Any] = {k: str(v) for k, v in params.items()
                           if isinstance(k, str) and k.startswith("lmcache.")}
    salt = getattr(request, "cache_salt", None)
    if salt:
        out[CACHE_SALT] = str(salt)
    lora = getattr(request, "lora_request", None)
    if lora:
        out[LORA_NAME] = str(lora.lora_name)
        out[LORA_PATH] = str(lora.lora_path or "")
    return out or None


def check_supported(vllm_config) -> None:
    """Refuse, at start, features whose KV lmcache cannot name by token ids and request configs.

    Raises:
        ValueError: prompt embeddings enabled, or pipeline_parallel_size > 1 (names the setting).
    """
    model_config = getattr(vllm_config, "model_config", None)
    if getattr(model_config, "enable_prompt_embeds", False):
        raise ValueError(
            "lmcache does not support enable_prompt_embeds=True: the KV of prompt embeddings is not "
            "named by token ids, so it could be served to a different prompt; disable prompt "
            "embeddings or the lmcache connector")
    pp = int(getattr(getattr(vllm_config, "parallel_config", None), "pipeline_parallel_size", 1) or 1)
    if pp > 1:
        raise ValueError(
            f"lmcache does not support pipeline_parallel_size={pp}: each pipeline stage holds "
            f"different layers under the same chunk key; use pipeline_parallel_size=1")
