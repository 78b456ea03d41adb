"""Cross-group invariants of a composed config, checked before anything is built.

Option files set compatible defaults, but a command line can combine any options;
these checks turn a bad combination into a ValueError that names the options and
numbers involved, instead of a failure deep inside a component.

An option's name is taken from its ``_target_``: the module name is the option name
(``lmcache.token_database.segment.SegmentTokenDatabase`` → ``segment``), the
project's file-name rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmcache.metadata import LMCacheMetadata


def option_name(node: Any) -> str | None:
    """The option name of a config node (module of its ``_target_``); None for None."""
    if node is None:
        return None
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not isinstance(target, str) or "." not in target:
        raise ValueError(f"config node {node!r} has no _target_ naming a class")
    return target.rsplit(".", 2)[-2]


def chunk_bytes(metadata: LMCacheMetadata) -> int:
    """Bytes of one full chunk's KV: prod(kv_shape) · itemsize(kv_dtype)."""
    return math.prod(metadata.kv_shape) * metadata.kv_dtype.itemsize


def _plain(cfg: DictConfig | Mapping) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def check_config(
    cfg: DictConfig | Mapping[str, Any],
    metadata: LMCacheMetadata | None = None,
    role: str = "worker",
) -> None:
    """Check the invariants that span config groups.

    Args:
        cfg: the composed config (resolved here).
        metadata: the runtime facts; enables the checks that need the KV shape.
        role: "worker" (the whole graph) or "scheduler" (token database only).

    Raises:
        ValueError: chunk_size <= 0 or different from metadata's; a missing slot; no tier
            or a tier class twice; the allocator smaller than one chunk; blend without the
            segment token database, a layerwise gpu_connector or save_unfull_chunk.
    """
    if role not in ("worker", "scheduler"):
        raise ValueError(f"role must be 'worker' or 'scheduler', got {role!r}")
    c = _plain(cfg)
    token_db = c.get("token_database")
    if not isinstance(token_db, Mapping):
        raise ValueError("config has no token_database option (e.g. token_database=chunked)")
    chunk_size = token_db.get("chunk_size", c.get("chunk_size"))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be an integer > 0, got {chunk_size!r}")
    if metadata is not None and metadata.chunk_size != chunk_size:
        raise ValueError(
            f"chunk_size={chunk_size} differs from the chunk size {metadata.chunk_size} in "
            f"metadata.kv_shape {tuple(metadata.kv_shape)}")
    if role == "scheduler":
        return

    for slot in ("allocator", "gpu_connector"):
        if not isinstance(c.get(slot), Mapping):
            raise ValueError(f"config has no {slot} option")
    storage = c.get("storage") or {}
    if not isinstance(storage.get("policy"), Mapping):
        raise ValueError("config has no storage/policy option (e.g. storage/policy=lru)")
    tiers = storage.get("backends")
    if not isinstance(tiers, Mapping) or not tiers:
        raise ValueError("storage/backends is empty: give at least one tier, e.g. "
                         "storage/backends=[local_cpu]")
    seen: dict[str, str] = {}
    for name, node in tiers.items():
        target = node.get("_target_") if isinstance(node, Mapping) else None
        if not isinstance(target, str):
            raise ValueError(f"storage tier {name!r} has no _target_ (its option file must "
                             f"hold `{name}: {{_target_: ...}}`)")
        if target in seen:
            raise ValueError(f"storage/backends lists the tier class {target} twice "
                             f"({seen[target]!r} and {name!r})")
        seen[target] = name

    if metadata is not None:
        size = c["allocator"].get("size_bytes")
        need = chunk_bytes(metadata)
        if isinstance(size, int) and size < need:
            raise ValueError(
                f"allocator size {size} bytes (max_local_cpu_size={c.get('max_local_cpu_size')} "
                f"GiB) cannot hold one chunk of {need} bytes (kv_shape "
                f"{tuple(metadata.kv_shape)}, {metadata.kv_dtype}); raise max_local_cpu_size")

    blend = c.get("blend")
    if blend is not None:
        blend_name = option_name(blend)
        db_name = option_name(token_db)
        gpu_name = option_name(c["gpu_connector"])
        if db_name != "segment" or "layerwise" not in gpu_name:
            raise ValueError(
                f"blend={blend_name} needs token_database=segment and a layerwise gpu_connector "
                f"(e.g. gpu_connector=vllm_layerwise); got token_database={db_name}, "
                f"gpu_connector={gpu_name}")
        if not token_db.get("save_unfull_chunk", c.get("save_unfull_chunk")):
            raise ValueError(f"blend={blend_name} needs save_unfull_chunk=true (CacheBlend "
                             "stores every segment, including a partial last chunk)")
