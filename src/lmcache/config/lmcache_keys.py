"""LMCache's configuration keys as lmcache knows them: the ones it translates (with their
parsers and LMCache's defaults), LMCache features it does not have yet, LMCache settings it
accepts only at their default, and LMCache's deprecated names. Read by
:mod:`lmcache.config.legacy`.
"""

from __future__ import annotations

from typing import Any, Callable

from lmcache.config import values as v
from lmcache.token_database.hashing import HASH_ALGORITHMS as _HASH_ALGORITHMS

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

HASH_ALGORITHMS = tuple(sorted(_HASH_ALGORITHMS))  # "builtin", "sha256_cbor"

KNOWN_KEYS = frozenset(SUPPORTED) | frozenset(FEATURES) | frozenset(UNSUPPORTED_DEFAULTS)
