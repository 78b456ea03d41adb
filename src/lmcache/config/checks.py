"""Invariants of a composed config, checked before anything is built.

Option files set compatible defaults, but a command line can combine any options and give
any value; these checks turn a bad value or a bad combination into a ValueError that names
the key, the value and what was expected, instead of a failure deep inside a component:

* every top-level LMCache key of ``conf/config.yaml`` has the right type and range, and
  ``max_local_cpu_size`` fits the machine's memory (:func:`check_values` and its table
  :data:`TOP_LEVEL_KEYS`, moved to :mod:`lmcache.config.top_level_keys`; re-exported here);
* the tiers: at least one, ``local_cpu`` first (it is the allocator backend every other
  tier stages through), no tier class twice, a remote tier with a ``remote_connector`` whose
  url scheme matches it, a local_disk tier with a writable directory and a capacity;
* the allocator holds one chunk, CacheBlend's companions are selected.

An option's name is taken from its ``_target_``: the module name is the option name
(``lmcache.token_database.segment.SegmentTokenDatabase`` → ``segment``), the
project's file-name rule.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmcache.config.machine import check_memory, machine_memory  # noqa: F401 (re-exported)
from lmcache.config.remote_url import REMOTE_SCHEMES, redact, remote_connector_for
from lmcache.config.top_level_keys import TOP_LEVEL_KEYS, check_values  # noqa: F401 (re-exported)
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


def check_directory(path: str, key: str = "local_disk") -> None:
    """Check that ``path`` is a writable directory, or can be created as one.

    Writability is probed by creating and removing a temporary file (``os.access`` answers
    yes to root even on a read-only mount). Nothing is created when ``path`` is missing.

    Raises:
        ValueError: ``path`` contains a NUL character or is a file; an existing directory where no file can be created;
            a missing path whose nearest existing parent is a file or not writable.
    """
    if "\x00" in path:
        raise ValueError(f"{key}={path!r} contains a NUL character, expected a directory path")
    path = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{key}={path!r} is a file, expected a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{key}={path!r} cannot be created: {parent!r} is a file, "
                         "expected a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lmcache-write-check-", dir=parent)
    except OSError as e:
        where = "is not writable" if parent == path else f"cannot be created in {parent!r}"
        raise ValueError(f"{key}={path!r} {where} ({e.strerror}); the local_disk tier "
                         "writes one file per chunk there") from None
    os.close(fd)
    os.unlink(probe)


def _check_tiers(c: dict) -> None:
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
    names = [option_name(node) for node in tiers.values()]
    if "pd" in names:
        _check_pd(c, names)
        return
    if names[0] != "local_cpu":
        rest = [n for n in names if n != "local_cpu"]
        raise ValueError(
            f"storage/backends=[{','.join(tiers)}]: local_cpu must be present and the first "
            "tier (the CPU tier is the allocator backend every other tier stages its chunks "
            f"through); e.g. storage/backends=[{','.join(['local_cpu', *rest])}]")
    for node in tiers.values():
        if "local_disk" in node:
            _check_disk_tier(node)
    if "remote" in names:
        _check_remote(c)


def _check_pd(c: dict, names: list[str]) -> None:
    """Disaggregated prefill: the pd tier alone (its buffer is the allocator), a transfer channel,
    the trailing partial chunk stored (as LMCache forces), all layers at once."""
    if names != ["pd"]:
        raise ValueError(f"storage/backends=[{','.join(names)}]: the pd tier comes alone "
                         "(storage/backends=[pd]; its buffer is the allocator)")
    if c.get("transfer_channel") is None:
        raise ValueError("storage/backends=[pd] needs a transfer channel: transfer_channel=nixl")
    if c.get("save_unfull_chunk") is not True:
        raise ValueError("storage/backends=[pd] needs save_unfull_chunk=true (the prefiller "
                         "pushes the partial last chunk too, as LMCache forces for PD)")
    if option_name(c.get("gpu_connector")) != "vllm_paged":
        raise ValueError("storage/backends=[pd] needs gpu_connector=vllm_paged (all layers at "
                         "once); layerwise PD is not supported")


def _check_disk_tier(node: Mapping[str, Any]) -> None:
    path, size = node.get("local_disk"), node.get("max_local_disk_size")
    if not isinstance(path, str) or not path.removeprefix("file://"):
        raise ValueError(f"storage/backends has local_disk but local_disk={path!r}: give the "
                         "tier's directory, e.g. local_disk=/path/to/dir max_local_disk_size=50")
    if isinstance(size, (int, float)) and not isinstance(size, bool) and size <= 0:
        raise ValueError(f"storage/backends has local_disk but max_local_disk_size={size!r} GiB: "
                         "give the tier's capacity, e.g. max_local_disk_size=50")
    check_directory(path, "local_disk")


def _check_remote(c: dict) -> None:
    connector = c.get("remote_connector")
    if not isinstance(connector, Mapping):
        raise ValueError("storage/backends has remote but no remote_connector is selected: "
                         "e.g. remote_connector=valkey remote_url=valkey://host:6379")
    url, name = connector.get("url"), option_name(connector)
    if not isinstance(url, str) or name not in REMOTE_SCHEMES.values():
        return  # a connector lmcache has no scheme for: it checks its own url
    try:
        wanted = remote_connector_for(url)
    except ValueError as e:
        raise ValueError(f"remote_connector={name} url {redact(url)!r}: {e}") from None
    if wanted != name:
        raise ValueError(f"remote_connector={name} cannot serve the url {redact(url)!r}, whose "
                         f"scheme needs remote_connector={wanted}")


def _check_p2p(c: dict) -> None:
    """The p2p tier needs the controller's worker and a transfer channel; the controller's
    worker needs its instance id, URLs and ports."""
    tiers = [option_name(n) for n in (c.get("storage", {}).get("backends") or {}).values()]
    if "p2p" in tiers:
        if c.get("controller") is None:
            raise ValueError("storage/backends p2p needs the cache controller: "
                             "controller=lmcache_worker (LMCache: enable_controller)")
        if c.get("transfer_channel") is None:
            raise ValueError("storage/backends p2p needs a transfer channel: transfer_channel=nixl")
    if c.get("controller") is not None:
        for key in ("lmcache_instance_id", "controller_pull_url", "controller_reply_url",
                    "lmcache_worker_ports"):
            if not c.get(key):
                raise ValueError(f"controller={option_name(c['controller'])} needs {key} "
                                 f"(as LMCache with enable_controller), got {c.get(key)!r}")
        from lmcache.controller.protocol import tcp_url

        for key in ("controller_pull_url", "controller_reply_url"):
            tcp_url(c[key], key)  # 'host:port' with a port in 1..65535, before any engine starts


def _check_gpu_allocator(c: dict) -> None:
    """allocator=gpu (the tier memory on a GPU) serves the CPU tier and the P2P tier only: the
    other tiers serialize or push objects as host memory."""
    if option_name(c.get("allocator")) != "gpu":
        return
    tiers = [option_name(n) for n in (c.get("storage", {}).get("backends") or {}).values()]
    other = [t for t in tiers if t not in ("local_cpu", "p2p")]
    if other:
        raise ValueError(f"allocator=gpu keeps the tier memory on the GPU, for "
                         f"storage/backends local_cpu and p2p only; storage/backends has "
                         f"{other}: use allocator=cpu")


def check_config(
    cfg: DictConfig | Mapping[str, Any],
    metadata: LMCacheMetadata | None = None,
    role: str = "worker",
) -> None:
    """Check a composed config's values and the invariants that span config groups.

    Args:
        cfg: the composed config (its top-level keys checked first, then resolved here).
        metadata: the runtime facts; enables the checks that need the KV shape.
        role: "worker" (the whole graph) or "scheduler" (values and token database only).

    Raises:
        ValueError: a top-level key of the wrong type or range (:func:`check_values`);
            chunk_size different from metadata's; a missing slot; no tier, ``local_cpu`` not
            the first tier, a tier class twice; a remote tier without a matching
            remote_connector; a local_disk tier without a writable directory
            (:func:`check_directory`) or capacity; the allocator smaller than one chunk;
            blend without the segment token database, a layerwise gpu_connector or
            save_unfull_chunk.
    """
    if role not in ("worker", "scheduler"):
        raise ValueError(f"role must be 'worker' or 'scheduler', got {role!r}")
    check_values(cfg)
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
    _check_tiers(c)
    _check_p2p(c)
    _check_gpu_allocator(c)

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
