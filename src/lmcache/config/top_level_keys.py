"""The top-level LMCache keys of a composed config: one table of key → parser, and the check.

:data:`TOP_LEVEL_KEYS` gives each top-level key of ``conf/config.yaml`` its parser (type and
range); :func:`check_values` runs it over a config, before anything is built, and checks that
``max_local_cpu_size`` fits the machine's memory. Moved out of :mod:`lmcache.config.checks`
(which re-exports both and calls :func:`check_values` first in ``check_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmcache.config import values as v
from lmcache.config.machine import check_memory
from lmcache.config.remote_url import redact, remote_connector_for
from lmcache.token_database.hashing import HASH_ALGORITHMS

TOP_LEVEL_KEYS: dict[str, Callable[[Any], Any]] = {
    "chunk_size": v.strict(v.positive_int, int),
    "save_unfull_chunk": v.strict(v.boolean, bool),
    "hash_algorithm": v.strict(v.one_of(*sorted(HASH_ALGORITHMS)), str),
    "hash_seed": v.hash_seed,
    "local_cpu": v.strict(v.boolean, bool),
    "max_local_cpu_size": v.strict(v.positive_float, float),
    "local_disk": v.strict(v.local_disk_path, str, None),
    "max_local_disk_size": v.strict(v.non_negative_float, float),
    "remote_url": v.strict(remote_connector_for, str, None),
    "save_decode_cache": v.strict(v.boolean, bool),
    "blocking_timeout_secs": v.strict(v.at_most(v.positive_float, v.MAX_TIMEOUT_S, "s"), float),
    "lookup_timeout_ms": v.strict(v.at_most(v.positive_int, v.MAX_TIMEOUT_S * 1000, "ms"), int),
    "internal_api_server_enabled": v.strict(v.boolean, bool),
    "internal_api_server_host": v.strict(v.string, str),
    "internal_api_server_port_start": v.strict(v.port, int),
    "extra_config": v.strict(v.optional_dict, dict, None),  # set by the LMCache translation
    "lmcache_instance_id": v.strict(v.optional_str, str, None),
    "controller_pull_url": v.strict(v.optional_str, str, None),
    "controller_reply_url": v.strict(v.optional_str, str, None),
    "lmcache_worker_ports": v.port_list,
    "lmcache_worker_heartbeat_time": v.strict(v.at_most(v.positive_float, v.MAX_TIMEOUT_S, "s"), float, None),
    "lmcache_worker_heartbeat_delay_time": v.strict(v.at_most(v.non_negative_float, v.MAX_TIMEOUT_S, "s"), float),
    "p2p_host": v.strict(v.optional_str, str, None),
    "p2p_init_ports": v.port_list,
    "p2p_lookup_ports": v.port_list,
}
"""Top-level LMCache key → parser of its composed value (ints pass where a number is asked)."""


def _shown(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


def check_values(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Check every top-level LMCache key present in ``cfg`` against :data:`TOP_LEVEL_KEYS`.

    A DictConfig is read key by key (only that key is resolved), so a bad value is reported
    by its key before any option that interpolates it fails to resolve.

    Raises:
        ValueError: "config key <key>=<value>: expected ..." (a url's password masked); a
            value whose interpolation cannot be resolved; max_local_cpu_size larger than the
            machine's memory (:func:`check_memory`).
    """
    for key, parse in TOP_LEVEL_KEYS.items():
        if key not in cfg:
            continue
        try:
            value = cfg[key]
        except OmegaConfBaseException as e:
            raise ValueError(f"config key {key} cannot be resolved: "
                             f"{str(e).splitlines()[0]}") from None
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        try:
            parse(value)
        except ValueError as e:
            raise ValueError(f"config key {key}={_shown(value)!r}: {e}") from None
        if key == "max_local_cpu_size":
            check_memory(value, key)
