"""LoadSpec, SaveSpec, ReqMeta and the ConnectorMetadata sent from vLLM's scheduler to its workers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class LoadSpec:
    """What one request loads from lmcache.

    Attributes:
        vllm_cached_tokens: tokens vLLM already holds locally (its prefix cache), counted at lookup.
        lmcache_cached_tokens: tokens lmcache holds (the lookup's answer, before the last-token rule).
        can_load: set once vLLM allocated blocks for the external tokens.
        num_external_tokens: how many tokens vLLM actually took from lmcache (update_state_after_alloc).
    """

    vllm_cached_tokens: int
    lmcache_cached_tokens: int
    can_load: bool = False
    num_external_tokens: int = 0


@dataclass
class SaveSpec:
    """What one request stores in this step.

    Attributes:
        skip_leading_tokens: the prefix already stored (a multiple of chunk_size); the store_mask
            is False over it.
        can_save: whether this step stores anything for the request.
    """

    skip_leading_tokens: int
    can_save: bool


@dataclass
class ReqMeta:
    """Per-request work for one step on the worker side.

    Token positions: vLLM needs tokens [load_from, load_end) from lmcache; lmcache fetches whole
    chunks [load_skip_tokens, load_fetch_end) (load_skip_tokens = load_from rounded down to
    chunk_size; load_fetch_end = load_end rounded up to the stored chunk) and writes only the
    needed positions. The save covers [0, save_end) with the store_mask False over
    ``save_spec.skip_leading_tokens``.

    Attributes:
        req_id: vLLM request id (also the lookup id that holds lmcache pins).
        token_ids: int64 CPU tensor ``[n]``, n = max(load_fetch_end, save_end).
        slot_mapping: int64 CPU tensor ``[n]``, flat paged-KV slot per token (block_id·block_size +
            offset); -1 where no block is allocated.
        load_spec: the request's LoadSpec when it loads in this step, else None.
        save_spec: the request's SaveSpec when it saves in this step, else None.
        request_configs: ``lmcache.*`` request configs (tags).
    """

    req_id: str
    token_ids: torch.Tensor
    slot_mapping: torch.Tensor
    load_spec: LoadSpec | None = None
    load_skip_tokens: int = 0
    load_from: int = 0
    load_end: int = 0
    load_fetch_end: int = 0
    save_spec: SaveSpec | None = None
    save_end: int = 0
    request_configs: dict | None = None


@dataclass
class LMCacheConnectorMetadata(KVConnectorMetadata):
    """ConnectorMetadata of one scheduler step: the requests with load/save work, and the lookup
    ids whose pins the worker must release."""

    requests: list[ReqMeta] = field(default_factory=list)
    unpin_ids: list[str] = field(default_factory=list)
