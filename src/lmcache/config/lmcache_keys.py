"""LMCache's configuration keys as lmcache knows them (LMCache 0.5.6's key table,
``lmcache/v1/config.py``): the ones it translates (with their parsers and LMCache's
defaults), LMCache features it does not have yet, LMCache settings it accepts only at their
default (each with the feature it configures), old keys that LMCache itself ignores, and
LMCache's deprecated names. Read by :mod:`lmcache.config.legacy`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from lmcache.config import values as v
from lmcache.token_database.hashing import HASH_ALGORITHMS as _HASH_ALGORITHMS

def _number_list(item: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A parser of None, one value, a list or a comma-separated string (LMCache's env form)
    into a list of ``item(x)``."""
    def parse(value: Any) -> list | None:
        items = v.any_list(value)
        return None if items is None else [item(x) for x in items]

    return parse


def _separator(value: Any) -> str:
    """blend_special_str as written (its spaces are part of the separator's tokens)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string (e.g. ' # # ')")
    return value


def _nixl_backends(value: Any) -> list[str] | None:
    """NIXL backends of the transfer channel: lmcache's NixlChannel runs one, UCX."""
    items = v.any_list(value)
    if items is not None and [str(x) for x in items] != ["UCX"]:
        raise ValueError("lmcache's NIXL channel runs the UCX backend only: use [UCX] or null")
    return items


# Keys lmcache translates: name → (parser, LMCache default).
SUPPORTED: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "chunk_size": (v.positive_int, 256),
    "local_cpu": (v.lmcache_boolean, True),
    "max_local_cpu_size": (v.positive_float, 5.0),
    "local_disk": (v.local_disk_path, None),
    "max_local_disk_size": (v.non_negative_float, 0.0),
    "remote_url": (v.optional_str, None),
    "remote_serde": (v.optional_str, "naive"),   # null: the default serde
    "use_layerwise": (v.lmcache_boolean, False),
    "save_unfull_chunk": (v.lmcache_boolean, False),
    "save_decode_cache": (v.lmcache_boolean, False),
    "cache_policy": (v.string, "LRU"),
    "blocking_timeout_secs": (v.at_most(v.positive_int, v.MAX_TIMEOUT_S, "s"), 10),
    "lookup_timeout_ms": (v.at_most(v.positive_int, v.MAX_TIMEOUT_S * 1000, "ms"), 3000),
    "pre_caching_hash_algorithm": (v.string, "builtin"),
    "extra_config": (v.optional_dict, None),
    # lmcache always prefetches the chunks of slower tiers in the background from lookup time
    # on, which is what LMCache's asynchronous loading does; the key is accepted either way.
    "enable_async_loading": (v.lmcache_boolean, False),
    # lmcache's per-process /health, /conf, /metrics server (lmcache.lmcache_manager)
    "internal_api_server_enabled": (v.lmcache_boolean, False),
    "internal_api_server_host": (v.string, "127.0.0.1"),
    "internal_api_server_port_start": (v.port, 6999),
    # CacheBlend (blend=cacheblend)
    "enable_blending": (v.lmcache_boolean, False),
    "blend_recompute_ratios": (_number_list(v.number), None),
    "blend_check_layers": (_number_list(v.integer), None),
    "blend_min_tokens": (v.positive_int, 256),
    "blend_special_str": (_separator, " # # "),
    # disaggregated prefill (storage/backends=[pd], deployment=pd_prefiller / pd_decoder)
    "enable_pd": (v.lmcache_boolean, False),
    "pd_role": (v.optional_str, None),
    "pd_buffer_size": (lambda x: None if x is None else v.positive_int(x), None),
    "pd_buffer_device": (v.optional_str, None),
    "pd_peer_host": (v.optional_str, None),
    "pd_peer_init_port": (v.port_list, None),
    "pd_peer_alloc_port": (v.port_list, None),
    "pd_proxy_host": (v.optional_str, None),
    "pd_proxy_port": (lambda x: None if x is None else v.port(x), None),
    "pd_allocation_timeout_sec": (v.positive_float, math.inf),
    "pd_condition_poll_interval_sec": (v.positive_float, 0.005),
    "transfer_channel": (v.optional_str, None),
    # the cache controller (controller=lmcache_worker) and P2P (storage/backends p2p)
    "enable_controller": (v.lmcache_boolean, False),
    "lmcache_instance_id": (v.optional_str, None),
    "controller_pull_url": (v.optional_str, None),
    "controller_reply_url": (v.optional_str, None),
    "lmcache_worker_ports": (v.port_list, None),
    "lmcache_worker_heartbeat_time": (lambda x: None if x is None else v.positive_float(x), None),
    "lmcache_worker_heartbeat_delay_time": (v.non_negative_float, 10),
    "enable_p2p": (v.lmcache_boolean, False),
    "p2p_host": (v.optional_str, None),
    "p2p_init_ports": (v.port_list, None),
    "p2p_lookup_ports": (v.port_list, None),
    "nixl_backends": (_nixl_backends, None),
}

# Feature switches of LMCache that lmcache does not have yet: only false is accepted.
FEATURES: dict[str, str] = {
    "enable_hidden_state_cache": "the hidden-state cache",
    "enable_chunk_statistics": "chunk statistics",
    "enable_lazy_memory_allocator": "the lazy memory allocator",
    "enable_kv_events": "KV events",
    "enable_scheduler_bypass_lookup": "the scheduler bypass lookup",
    "run_script_api_enabled": "the run-script API of LMCache's internal API server",
}

_BLEND, _P2P, _PD, _CTRL = "CacheBlend", "P2P KV-cache sharing", "disaggregated prefill (PD)", \
    "the cache controller"
_GDS, _API, _PLUGINS = "GPUDirect Storage (GDS)", "LMCache's internal API server", "plugins"
_HIDDEN, _STATS, _LAZY = "the hidden-state cache", "chunk statistics", "the lazy memory allocator"

# Other LMCache keys: name → (LMCache default, the feature it configures or None). Accepted
# only at their default value; any other value is an error naming the feature.
UNSUPPORTED: dict[str, tuple[Any, str | None]] = {
    "local_cpu_use_hugepages": (False, "huge pages for the CPU tier"),
    "reserve_local_cpu_size": (0.0, "reserved CPU memory"),
    "local_disk_path_sharding": ("by_gpu", "local_disk path sharding"),
    "blend_thresholds": (None, _BLEND + "'s threshold selection"),
    "retrieve_locations": (None, "retrieve_locations in the config"),
    "store_location": (None, "store_location in the config"),
    "mp_host": (None, "LMCache's multiprocess mode"), "mp_port": (5555, "LMCache's multiprocess mode"),
    "lmcache_worker_ids": (None, _CTRL),
    "pd_peer_query_port": (None, _PD + "'s bidirectional mode"),
    "pd_shutdown_timeout_sec": (5.0, _PD), "pd_max_prefill_len": (0, _PD),
    "pd_backend_mode": ("async", _PD + "'s backend modes"),  # lmcache pushes before the step ends
    "pd_skip_proxy_notification": (False, _PD + "'s proxy notification"),
    "pd_bidirectional": (False, _PD + "'s bidirectional mode"),
    "nixl_buffer_size": (None, "NIXL"),
    "nixl_buffer_device": (None, "NIXL"),
    "gds_path": (None, _GDS), "gds_path_sharding": ("by_gpu", _GDS), "gds_buffer_size": (None, _GDS),
    "use_gds": (True, _GDS), "gds_backend": ("cufile", _GDS),
    "maru_path": (None, "the Maru backend"), "maru_pool_size": (4.0, "the Maru backend"),
    "audit_actual_remote_url": (None, "the audit remote connector"),
    "internal_api_server_include_index_list": (None, _API),
    "internal_api_server_socket_path_prefix": (None, _API), "script_allowed_imports": (None, _API),
    "external_lookup_client": (None, "external lookup clients"),
    "py_enable_gc": (True, None), "numa_mode": (None, "NUMA-aware allocation"),
    "priority_limit": (None, "request priorities"), "min_retrieve_tokens": (0, None),
    "hit_miss_ratio": (None, None), "lookup_server_worker_ids": (None, None),
    "runtime_plugin_locations": (None, _PLUGINS), "storage_plugins": (None, _PLUGINS),
    "remote_storage_plugins": (None, _PLUGINS),
    "lazy_memory_initial_ratio": (0.2, _LAZY), "lazy_memory_expand_trigger_ratio": (0.5, _LAZY),
    "lazy_memory_step_ratio": (0.1, _LAZY), "lazy_memory_safe_size": (0.0, _LAZY),
    "chunk_statistics_auto_start_statistics": (False, _STATS),
    "chunk_statistics_auto_exit_timeout_hours": (0.0, _STATS),
    "chunk_statistics_auto_exit_target_unique_chunks": (0, _STATS),
    "chunk_statistics_strategy": ("memory_bloom_filter", _STATS),
    "use_gpu_connector_v3": (False, "GPU connector v3"),
    "pin_timeout_sec": (300, None), "pin_check_interval_sec": (30, None),
    "remote_config_url": (None, "remote configuration"), "app_id": (None, "remote configuration"),
    "max_hidden_state_cpu_size": (2.0, _HIDDEN), "hidden_state_layers": (None, _HIDDEN),
    "hidden_states_retrieve_mode": ("prefix_strict", _HIDDEN),
}
UNSUPPORTED_DEFAULTS: dict[str, Any] = {k: d for k, (d, _) in UNSUPPORTED.items()}

# Old keys that LMCache 0.5.6 no longer reads (it logs "Unknown configuration key" and goes
# on): lmcache warns the same way and ignores them. Name → hint.
IGNORED_OLD_KEYS: dict[str, str] = {
    "local_device": "LMCache's CPU tier is local_cpu/max_local_cpu_size, a disk tier "
                    "local_disk/max_local_disk_size",
    "pipelined_backend": "retrieval is always pipelined with the tiers' prefetch",
    "async_loading": "the current key is enable_async_loading",
    "enable_nixl": "the current key is enable_pd (disaggregated prefill)",
    "nixl_receiver_host": "the current key is pd_peer_host (disaggregated prefill)",
    "nixl_receiver_port": "the current keys are pd_peer_init_port/pd_peer_alloc_port",
    "nixl_peer_port": "the current key is pd_peer_init_port",
    "nixl_enable_gc": "no current equivalent",
}

# LMCache's deprecated names → current names (``_CONFIG_ALIASES`` of LMCache 0.5.6).
ALIASES: dict[str, str] = {
    "enable_xpyd": "enable_pd",
    "nixl_peer_host": "pd_peer_host", "nixl_peer_init_port": "pd_peer_init_port",
    "nixl_peer_alloc_port": "pd_peer_alloc_port", "nixl_proxy_host": "pd_proxy_host",
    "nixl_proxy_port": "pd_proxy_port", "nixl_buffer_size": "pd_buffer_size",
    "nixl_role": "pd_role",
    "controller_url": "controller_pull_url",
    "lmcache_worker_port": "lmcache_worker_ports",
    "plugin_locations": "runtime_plugin_locations",
    "external_backends": "storage_plugins",
}

HASH_ALGORITHMS = tuple(sorted(_HASH_ALGORITHMS))

KNOWN_KEYS = frozenset(SUPPORTED) | frozenset(FEATURES) | frozenset(UNSUPPORTED)
