"""LMCache's configuration (YAML file, ``LMCACHE_*`` env, vLLM extra config) as Hydra overrides.

An existing LMCache deployment keeps working: its YAML (``LMCACHE_CONFIG_FILE``), its
``LMCACHE_<KEY>`` environment variables and the ``lmcache.<key>`` entries of vLLM's
``kv_connector_extra_config`` are read with LMCache's key names and defaults and
translated into overrides of lmcache's Hydra config (``conf/``), e.g.
``local_disk: file:///nvme/`` → ``storage/backends=[local_cpu,local_disk]`` ``++local_disk='/nvme/'``.

Nothing is ignored silently: an unknown key, a bad value, a feature lmcache does not
have yet (CacheBlend, P2P, PD, controller), or a known LMCache setting it does not
support set to anything but its default is a ValueError naming the key and its source.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from typing import Any, Callable

import yaml

from lmcache.config import values as v
from lmcache.config.compose import list_options

logger = logging.getLogger(__name__)

REMOTE_SCHEMES: dict[str, str] = {
    "valkey": "valkey",
    "redis": "valkey",
    "valkeys": "valkey",
    "rediss": "valkey",
    "valkey-cluster": "valkey_cluster",
    "redis-cluster": "valkey_cluster",
    "fs": "fs",
    "lm": "lm",
    "blackhole": "blackhole",
}
"""``remote_url`` scheme → ``remote_connector`` option: the one table of this mapping."""

EXTRA_CONFIG_PREFIX = "lmcache."
ENV_PREFIX = "LMCACHE_"
# LMCACHE_* variables that are not configuration keys (read elsewhere, or by LMCache tools).
NON_CONFIG_ENV = frozenset({
    "LMCACHE_CONFIG_FILE", "LMCACHE_LOG_LEVEL", "LMCACHE_LOGGING_LEVEL", "LMCACHE_TRACK_USAGE",
    "LMCACHE_TINY_MODEL_DIR", "LMCACHE_IPC_DIR", "LMCACHE_TEST_CACHE",
})

# Keys lmcache translates: name → (parser, LMCache default).
SUPPORTED: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "chunk_size": (v.positive_int, 256),
    "local_cpu": (v.boolean, True),
    "max_local_cpu_size": (v.positive_float, 5.0),
    "local_disk": (v.local_disk_path, None),
    "max_local_disk_size": (v.non_negative_float, 0.0),
    "remote_url": (v.optional_str, None),
    "remote_serde": (v.string, "naive"),
    "use_layerwise": (v.boolean, False),
    "save_unfull_chunk": (v.boolean, False),
    "save_decode_cache": (v.boolean, False),
    "cache_policy": (v.string, "LRU"),
    "blocking_timeout_secs": (v.positive_int, 10),
    "lookup_timeout_ms": (v.positive_int, 3000),
    "pre_caching_hash_algorithm": (v.string, "builtin"),
    "extra_config": (v.optional_dict, None),
}

# Feature switches of LMCache that lmcache does not have yet: only false is accepted.
FEATURES: dict[str, str] = {
    "enable_blending": "CacheBlend",
    "enable_p2p": "P2P KV-cache sharing",
    "enable_pd": "disaggregated prefill (PD)",
    "enable_controller": "the cache controller",
    "enable_async_loading": "asynchronous loading",
}

# Other LMCache keys (with LMCache's defaults): accepted only at their default value.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "local_cpu_use_hugepages": False, "reserve_local_cpu_size": 0.0,
    "local_disk_path_sharding": "by_gpu",
    "blend_recompute_ratios": None, "blend_thresholds": None, "blend_check_layers": None,
    "blend_min_tokens": 256, "blend_special_str": " # # ",
    "retrieve_locations": None, "store_location": None,
    "p2p_host": None, "p2p_init_ports": None, "p2p_lookup_ports": None,
    "lmcache_instance_id": None, "controller_pull_url": None, "controller_reply_url": None,
    "lmcache_worker_ports": None, "lmcache_worker_ids": None,
    "lmcache_worker_heartbeat_delay_time": 10, "lmcache_worker_heartbeat_time": None,
    "pd_role": None, "pd_buffer_size": None, "pd_buffer_device": None, "pd_peer_host": None,
    "pd_peer_init_port": None, "pd_peer_alloc_port": None, "pd_peer_query_port": None,
    "pd_proxy_host": None, "pd_proxy_port": None, "transfer_channel": None,
    "nixl_backends": None, "nixl_buffer_size": None, "nixl_buffer_device": None,
    "gds_path": None, "gds_buffer_size": None, "audit_actual_remote_url": None,
    "external_lookup_client": None, "py_enable_gc": True, "numa_mode": None,
    "priority_limit": None, "min_retrieve_tokens": 0, "enable_scheduler_bypass_lookup": False,
    "internal_api_server_enabled": False, "runtime_plugin_locations": None,
    "storage_plugins": None, "enable_lazy_memory_allocator": False,
    "enable_chunk_statistics": False, "enable_kv_events": False, "use_gpu_connector_v3": False,
    "mp_host": None, "mp_port": 5555, "remote_config_url": None, "app_id": None,
    "enable_hidden_state_cache": False,
}

ALIASES: dict[str, str] = {  # LMCache's deprecated names
    "enable_xpyd": "enable_pd",
    "controller_url": "controller_pull_url",
    "lmcache_worker_port": "lmcache_worker_ports",
}

HASH_ALGORITHMS = ("builtin", "sha256_cbor")

KNOWN_KEYS = frozenset(SUPPORTED) | frozenset(FEATURES) | frozenset(UNSUPPORTED_DEFAULTS)


def overrides_from_legacy(
    yaml_path: str | os.PathLike | None,
    env: Mapping[str, str],
    extra_config: Mapping[str, Any] | None,
) -> list[str]:
    """Hydra overrides equivalent to an LMCache configuration.

    Sources, lowest precedence first: the YAML file ``yaml_path`` (LMCache's
    ``LMCACHE_CONFIG_FILE``; None or "" → none), ``env`` entries ``LMCACHE_<KEY>`` (the
    key upper-cased; strings parsed: "true"/"1"/"False", numbers, comma lists, JSON
    dicts; a name far from every key, e.g. ``LMCACHE_IPC_DIR``, belongs to another tool
    and is skipped with a warning, a near miss is an unknown-key error), then
    ``extra_config`` entries whose key starts with ``lmcache.`` (vLLM's
    ``kv_connector_extra_config``; other entries belong to others and are skipped).

    Returns:
        Overrides for :func:`lmcache.config.compose_config`, e.g.
        ``["storage/backends=[local_cpu,local_disk]", "++local_disk='/nvme'",
        "++chunk_size=512"]``; ``[]`` when nothing is set. Only keys that were set are
        translated (group selections first, then values).

    Raises:
        ValueError: unknown key (close matches suggested), bad value, a feature lmcache
            lacks switched on, an unsupported setting away from its default, a remote_url
            with an unknown scheme, or an option (serde, policy...) that is not installed.
            The message names the key, the value and where it came from.
        FileNotFoundError: ``yaml_path`` does not exist.
    """
    raw: dict[str, tuple[Any, str]] = {}
    if yaml_path:
        for key, value in _read_yaml(yaml_path).items():
            source = f"LMCache config file {str(yaml_path)!r}"
            raw[_canonical(str(key), source)] = (value, source)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and name not in NON_CONFIG_ENV:
            key = name[len(ENV_PREFIX):].lower()
            if _is_other_tools_variable(ALIASES.get(key, key)):
                logger.warning("ignoring environment variable %s: not an LMCache config key", name)
                continue
            source = f"environment variable {name}"
            raw[_canonical(key, source)] = (value, source)
    for name, value in (extra_config or {}).items():
        if isinstance(name, str) and name.startswith(EXTRA_CONFIG_PREFIX):
            source = f"kv_connector_extra_config[{name!r}]"
            raw[_canonical(name[len(EXTRA_CONFIG_PREFIX):], source)] = (value, source)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (value, source) in raw.items():
        values[key] = _parse(key, value, source)
        sources[key] = source
    return _translate(values, sources)


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"LMCache config file {str(path)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"LMCache config file {str(path)!r} must hold a mapping of keys to values, "
            f"got {type(data).__name__}")
    return data


def _is_other_tools_variable(key: str) -> bool:
    """The environment is shared: an LMCACHE_* name far from every config key belongs to
    something else (e.g. LMCACHE_IPC_DIR); a near miss (LMCACHE_CHUNKSIZE) is a typo."""
    return key not in KNOWN_KEYS and not difflib.get_close_matches(
        key, KNOWN_KEYS, n=1, cutoff=0.8)


def _canonical(key: str, source: str) -> str:
    key = ALIASES.get(key, key)
    if key not in KNOWN_KEYS:
        close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown LMCache config key {key!r} (from {source}){hint}")
    return key


def _parse(key: str, value: Any, source: str) -> Any:
    try:
        if key in SUPPORTED:
            return SUPPORTED[key][0](value)
        if key in FEATURES:
            parsed = v.boolean(value)
            if parsed:
                raise ValueError(
                    f"{FEATURES[key]} is not available in lmcache yet; remove the key or set "
                    "it to false")
            return parsed
        default = UNSUPPORTED_DEFAULTS[key]
        parsed = v.like(default, value)
        if parsed != default:
            raise ValueError(
                f"this LMCache setting is not supported by lmcache; remove it or set it to "
                f"its default {default!r}")
        return parsed
    except ValueError as e:
        raise ValueError(f"LMCache config key {key}={value!r} (from {source}): {e}") from None


def _option(group: str, name: str, key: str, value: Any, source: str) -> str:
    available = list_options(group)
    if name not in available:
        raise ValueError(
            f"LMCache config key {key}={value!r} (from {source}) needs the {group} option "
            f"{name!r}, which is not installed; available: {', '.join(available) or 'none'}")
    return name


def _translate(values: dict[str, Any], sources: dict[str, str]) -> list[str]:
    def src(k: str) -> str:
        return sources.get(k, "LMCache's default")

    def get(k: str) -> Any:
        return values.get(k, SUPPORTED[k][1])

    groups: list[str] = []
    settings: list[str] = []

    if not get("local_cpu"):
        raise ValueError(
            f"LMCache config key local_cpu=False (from {src('local_cpu')}) is not supported: "
            "lmcache's CPU tier is also the allocator backend every other tier stages through; "
            "keep local_cpu true (size it with max_local_cpu_size)")
    tiers = ["local_cpu"]
    local_disk = get("local_disk")
    if local_disk is not None:
        tiers.append(_option("storage/backends", "local_disk", "local_disk", local_disk,
                             src("local_disk")))
        if get("max_local_disk_size") <= 0:
            raise ValueError(
                f"LMCache config key local_disk={local_disk!r} (from {src('local_disk')}) needs "
                f"max_local_disk_size > 0 GB, got {get('max_local_disk_size')!r} "
                f"(from {src('max_local_disk_size')})")
        settings.append(f"++local_disk={v.override_value(local_disk)}")
    remote_url = get("remote_url")
    if remote_url is not None:
        scheme = remote_url.split("://", 1)[0].lower() if "://" in remote_url else ""
        if scheme not in REMOTE_SCHEMES:
            raise ValueError(
                f"LMCache config key remote_url={remote_url!r} (from {src('remote_url')}): "
                f"unknown scheme {scheme!r}; known schemes: {', '.join(sorted(REMOTE_SCHEMES))}")
        tiers.append(_option("storage/backends", "remote", "remote_url", remote_url,
                             src("remote_url")))
        connector = _option("remote_connector", REMOTE_SCHEMES[scheme], "remote_url",
                            remote_url, src("remote_url"))
        groups.append(f"remote_connector={connector}")
        settings.append(f"++remote_url={v.override_value(remote_url)}")
    if tiers != ["local_cpu"]:
        groups.insert(0, f"storage/backends=[{','.join(tiers)}]")

    if "remote_serde" in values:
        groups.append("serde=" + _option("serde", values["remote_serde"], "remote_serde",
                                         values["remote_serde"], src("remote_serde")))
    if "cache_policy" in values:
        policy = values["cache_policy"]
        groups.append("storage/policy=" + _option("storage/policy", policy.lower(),
                                                  "cache_policy", policy, src("cache_policy")))
    if get("use_layerwise"):
        groups.append("gpu_connector=" + _option("gpu_connector", "vllm_layerwise",
                                                 "use_layerwise", True, src("use_layerwise")))
    if "pre_caching_hash_algorithm" in values:
        algo = values["pre_caching_hash_algorithm"]
        if algo not in HASH_ALGORITHMS:
            raise ValueError(
                f"LMCache config key pre_caching_hash_algorithm={algo!r} (from "
                f"{src('pre_caching_hash_algorithm')}): expected one of {', '.join(HASH_ALGORITHMS)}")
        settings.append(f"++hash_algorithm={algo}")

    for key in ("chunk_size", "max_local_cpu_size", "max_local_disk_size", "save_unfull_chunk",
                "save_decode_cache", "blocking_timeout_secs", "lookup_timeout_ms",
                "extra_config"):
        if key in values:
            settings.append(f"++{key}={v.override_value(values[key])}")
    return groups + settings
