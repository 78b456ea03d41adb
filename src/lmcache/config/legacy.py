"""LMCache's configuration (YAML file, ``LMCACHE_*`` env, vLLM extra config) as Hydra overrides.

An existing LMCache deployment keeps working: its YAML (``LMCACHE_CONFIG_FILE``), its
``LMCACHE_<KEY>`` environment variables and the ``lmcache.<key>`` entries of vLLM's
``kv_connector_extra_config`` are read with LMCache's key names and defaults and
translated into overrides of lmcache's Hydra config (``conf/``), e.g.
``local_disk: file:///nvme/`` → ``storage/backends=[local_cpu,local_disk]`` ``++local_disk='/nvme/'``.

An unknown key, a bad value, a feature lmcache does not have yet (CacheBlend, P2P, PD,
controller), or a known LMCache setting it does not support set to anything but its
default is a ValueError naming the key and its source. What is skipped is skipped with a
warning when it looks meant for lmcache: an ``LMCACHE_*`` variable far from every key
(another tool's, e.g. ``LMCACHE_IPC_DIR``; names in :data:`NON_CONFIG_ENV` silently), an
extra_config key with a misspelled prefix (``lmcahce.chunk_size``, ``lmcache_chunk_size``).
Other extra_config keys belong to others and are skipped silently. Values are taken
literally (``${`` is not an interpolation).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from lmcache.config import values as v
from lmcache.config.compose import list_options
from lmcache.config.lmcache_keys import (ALIASES, FEATURES, HASH_ALGORITHMS, KNOWN_KEYS,
                                         SUPPORTED, UNSUPPORTED_DEFAULTS)
from lmcache.config.remote_url import REMOTE_SCHEMES, redact, remote_connector_for

__all__ = ["ALIASES", "FEATURES", "HASH_ALGORITHMS", "KNOWN_KEYS", "REMOTE_SCHEMES", "SUPPORTED",
           "UNSUPPORTED_DEFAULTS", "overrides_from_legacy"]

logger = logging.getLogger(__name__)

EXTRA_CONFIG_PREFIX = "lmcache."
ENV_PREFIX = "LMCACHE_"
# LMCACHE_* variables that are not configuration keys (read elsewhere, or by LMCache tools).
NON_CONFIG_ENV = frozenset({
    "LMCACHE_CONFIG_FILE", "LMCACHE_LOG_LEVEL", "LMCACHE_LOGGING_LEVEL", "LMCACHE_TRACK_USAGE",
    "LMCACHE_TINY_MODEL_DIR", "LMCACHE_IPC_DIR", "LMCACHE_TEST_CACHE",
})

def overrides_from_legacy(
    yaml_path: str | os.PathLike | None,
    env: Mapping[str, str],
    extra_config: Mapping[str, Any] | None,
) -> list[str]:
    """Hydra overrides equivalent to an LMCache configuration.

    Sources, lowest precedence first: the YAML file ``yaml_path`` (LMCache's
    ``LMCACHE_CONFIG_FILE``; None or "" → none), ``env`` entries ``LMCACHE_<KEY>`` (the
    key upper-cased; strings parsed: "true"/"1"/"False", numbers, comma lists, JSON
    dicts; a name far from every key, e.g. ``LMCACHE_BENCH_OUTPUT``, belongs to another
    tool and is skipped with a warning, a near miss is an unknown-key error), then
    ``extra_config`` entries whose key starts with ``lmcache.`` (vLLM's
    ``kv_connector_extra_config``; other entries belong to others and are skipped, with a
    warning suggesting ``lmcache.<key>`` when the prefix looks misspelled). Every value is
    taken literally: a ``${`` in it is text, not an interpolation.

    Returns:
        Overrides for :func:`lmcache.config.compose_config`, e.g.
        ``["storage/backends=[local_cpu,local_disk]", "++local_disk='/nvme'",
        "++chunk_size=512"]``; ``[]`` when nothing is set. Only keys that were set are
        translated (group selections first, then values).

    Raises:
        ValueError: unknown key (close matches suggested), bad value, a feature lmcache
            lacks switched on, an unsupported setting away from its default, a remote_url
            with an unknown scheme or without a host, an extra_config dict that Hydra
            overrides cannot carry, or an option (serde, policy...) that is not installed.
            The message names the key, the value and where it came from.
        FileNotFoundError / IsADirectoryError: ``yaml_path`` is missing or a directory
            (the message names ``LMCACHE_CONFIG_FILE`` when the path came from it).
    """
    raw: dict[str, tuple[Any, str]] = {}
    if yaml_path:
        source = (f"LMCACHE_CONFIG_FILE={str(yaml_path)!r}"
                  if str(yaml_path) == env.get("LMCACHE_CONFIG_FILE")
                  else f"LMCache config file {str(yaml_path)!r}")
        for key, value in _read_yaml(yaml_path, source).items():
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
        elif (meant := _misspelled_prefix(name)) is not None:
            logger.warning("ignoring kv_connector_extra_config[%r]: lmcache reads only keys "
                           "prefixed %r; did you mean %r?", name, EXTRA_CONFIG_PREFIX, meant)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (value, source) in raw.items():
        values[key] = _parse(key, value, source)
        sources[key] = source
    return _translate(values, sources)


def _read_yaml(path: str | os.PathLike, named: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{named}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{named} is a directory, expected an LMCache YAML file")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{named} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{named} must hold a mapping of keys to values, got "
                         f"{type(data).__name__}")
    return data


_PREFIXED = re.compile(r"([A-Za-z]+)([._:\-])(.+)")


def _misspelled_prefix(name: Any) -> str | None:
    """``lmcache.<key>`` when an extra_config key looks meant for lmcache but its prefix is
    misspelled (``lmcahce.chunk_size``, ``LMCache.chunk_size``) or has the wrong separator
    and a known key (``lmcache_chunk_size``); None otherwise (``lmcache_rpc_port`` is a
    real key of other software)."""
    match = _PREFIXED.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return None
    prefix, sep, rest = match.groups()
    prefix = prefix.lower()
    if prefix != "lmcache" and not difflib.get_close_matches(prefix, ["lmcache"], cutoff=0.7):
        return None
    key = ALIASES.get(rest.lower(), rest.lower())
    if sep == "." or key in KNOWN_KEYS:
        return EXTRA_CONFIG_PREFIX + (rest if sep == "." else rest.lower())
    return None


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
        try:
            option = remote_connector_for(remote_url)
        except ValueError as e:
            raise ValueError(f"LMCache config key remote_url={redact(remote_url)!r} (from "
                             f"{src('remote_url')}): {e}") from None
        tiers.append(_option("storage/backends", "remote", "remote_url", remote_url,
                             src("remote_url")))
        connector = _option("remote_connector", option, "remote_url", remote_url,
                            src("remote_url"))
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
            try:
                settings.append(f"++{key}={v.override_value(values[key])}")
            except ValueError as e:
                raise ValueError(f"LMCache config key {key}={values[key]!r} (from "
                                 f"{src(key)}): {e}") from None
    return groups + settings
