"""LMCache's configuration (YAML file, ``LMCACHE_*`` env, vLLM extra config) as Hydra overrides.

An existing LMCache deployment keeps working: its YAML (``LMCACHE_CONFIG_FILE``), its
``LMCACHE_<KEY>`` environment variables and the ``lmcache.<key>`` entries of vLLM's
``kv_connector_extra_config`` are read with LMCache's key names and defaults and
translated into overrides of lmcache's Hydra config (``conf/``), e.g.
``local_disk: file:///nvme/`` → ``storage/backends=[local_cpu,local_disk]`` ``++local_disk='/nvme/'``.

An unknown key (with a "did you mean"), a bad value, a feature lmcache does not have yet
(CacheBlend, P2P, PD, controller...: the message names the feature), or a known LMCache
setting it does not support set to anything but its default is a ValueError naming the key
and its source. Old keys that LMCache 0.5.6 itself ignores (``local_device``,
``pipelined_backend``...) are ignored with a warning, as LMCache does. ``local_cpu: false``
keeps CPU memory as the staging allocator only (no CPU cache tier), as in LMCache.
What is skipped is skipped with a warning when it looks meant for lmcache: an ``LMCACHE_*``
variable far from every key (another tool's, e.g. ``LMCACHE_IPC_DIR``; names in
:data:`NON_CONFIG_ENV` silently), an ``LM_CACHE_*`` variable (an old prefix), an
extra_config key with a misspelled prefix (``lmcahce.chunk_size``, ``lmcache_chunk_size``).
Other extra_config keys belong to others and are skipped silently. Values are taken
literally (``${`` is not an interpolation); environment values lose surrounding quotes, as
in LMCache.
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
from lmcache.config.lmcache_keys import (ALIASES, FEATURES, HASH_ALGORITHMS, IGNORED_OLD_KEYS,
                                         KNOWN_KEYS, SUPPORTED, UNSUPPORTED, UNSUPPORTED_DEFAULTS)
from lmcache.config.remote_url import REMOTE_SCHEMES, redact, remote_connector_for

__all__ = ["ALIASES", "FEATURES", "HASH_ALGORITHMS", "IGNORED_OLD_KEYS", "KNOWN_KEYS",
           "REMOTE_SCHEMES", "SUPPORTED", "UNSUPPORTED", "UNSUPPORTED_DEFAULTS",
           "legacy_overrides", "overrides_from_legacy"]

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
    key upper-cased; surrounding quotes stripped as LMCache does, then parsed:
    "true"/"1"/"False", numbers, comma lists, JSON dicts; a name far from every key, e.g.
    ``LMCACHE_BENCH_OUTPUT``, belongs to another tool and is skipped with a warning, a near
    miss is an unknown-key error; ``LM_CACHE_<KEY>``, an old prefix, is not read and is
    named in a warning), then ``extra_config`` entries whose key starts with ``lmcache.``
    (vLLM's ``kv_connector_extra_config``; other entries belong to others and are skipped,
    with a warning suggesting ``lmcache.<key>`` when the prefix looks misspelled). Old keys
    that LMCache 0.5.6 ignores (``local_device``, ``pipelined_backend``...) are ignored with
    a warning, as LMCache does. Every value is taken literally: a ``${`` in it is text, not an
    interpolation.

    Returns:
        Overrides for :func:`lmcache.config.compose_config`, e.g.
        ``["storage/backends=[local_cpu,local_disk]", "++local_disk='/nvme'",
        "++chunk_size=512"]``; ``[]`` when nothing is set. Only keys that were set are
        translated (group selections first, then values). :func:`legacy_overrides` gives
        the same overrides with the source of each.

    Raises:
        ValueError: unknown key (close matches suggested), bad value, a feature lmcache
            lacks switched on or configured (the message names the feature), an unsupported
            setting away from its default, a remote_url with an unknown scheme or without a
            host, an extra_config dict that Hydra overrides cannot carry, or an option
            (serde, policy...) that is not installed. The message names the key, the value
            and where it came from.
        FileNotFoundError / IsADirectoryError: ``yaml_path`` is missing or a directory
            (the message names ``LMCACHE_CONFIG_FILE`` when the path came from it).
    """
    return [override for override, _ in legacy_overrides(yaml_path, env, extra_config)]


def legacy_overrides(
    yaml_path: str | os.PathLike | None,
    env: Mapping[str, str],
    extra_config: Mapping[str, Any] | None,
) -> list[tuple[str, str]]:
    """:func:`overrides_from_legacy` as ``(override, source)`` pairs; the source names
    where the value came from, e.g. ``"environment variable LMCACHE_CHUNK_SIZE"`` or
    ``"LMCache config file '/etc/lmcache.yaml'"`` (several, joined by "; ", for an override
    that more than one key decides, such as the tier list). Raises as
    :func:`overrides_from_legacy`."""
    raw: dict[str, tuple[Any, str]] = {}
    if yaml_path:
        source = (f"LMCACHE_CONFIG_FILE={str(yaml_path)!r}"
                  if str(yaml_path) == env.get("LMCACHE_CONFIG_FILE")
                  else f"LMCache config file {str(yaml_path)!r}")
        for key, value in _read_yaml(yaml_path, source).items():
            _collect(raw, str(key), value, source)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and name not in NON_CONFIG_ENV:
            key = name[len(ENV_PREFIX):].lower()
            if key in IGNORED_OLD_KEYS or _is_other_tools_variable(ALIASES.get(key, key)):
                logger.warning("ignoring environment variable %s: not an LMCache config key%s",
                               name, _old_key_hint(key))
                continue
            source = f"environment variable {name}"
            _collect(raw, key, v.unquote(value) if isinstance(value, str) else value, source)
        elif (meant := _old_env_prefix(name)) is not None:
            logger.warning("ignoring environment variable %s: lmcache, like LMCache, reads "
                           "LMCACHE_<KEY> variables%s", name,
                           f"; did you mean {meant}?" if meant else "")
    for name, value in (extra_config or {}).items():
        if isinstance(name, str) and name.startswith(EXTRA_CONFIG_PREFIX):
            source = f"kv_connector_extra_config[{name!r}]"
            _collect(raw, name[len(EXTRA_CONFIG_PREFIX):], value, source)
        elif (meant := _misspelled_prefix(name)) is not None:
            logger.warning("ignoring kv_connector_extra_config[%r]: lmcache reads only keys "
                           "prefixed %r; did you mean %r?", name, EXTRA_CONFIG_PREFIX, meant)

    # Features lmcache lacks are reported first: they are the reason a config cannot start.
    for key, (value, source) in raw.items():
        if key not in SUPPORTED:
            _check_unsupported(key, value, source)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (value, source) in raw.items():
        if key in SUPPORTED:
            values[key] = _parse(key, value, source)
            sources[key] = source
    return _translate(values, sources)


def _collect(raw: dict[str, tuple[Any, str]], key: str, value: Any, source: str) -> None:
    """Put one key of a source into ``raw`` under its current name; old keys LMCache
    ignores are ignored with a warning (as LMCache logs them); unknown keys raise."""
    if key in ALIASES:
        logger.info("LMCache config key %s (from %s) is read as %s, its current name",
                    key, source, ALIASES[key])
        key = ALIASES[key]
    if key in IGNORED_OLD_KEYS:
        logger.warning("ignoring LMCache config key %s (from %s): LMCache 0.5.6 no longer "
                       "reads it either (%s)", key, source, IGNORED_OLD_KEYS[key])
        return
    raw[_canonical(key, source)] = (value, source)


def _old_key_hint(key: str) -> str:
    return (f" (an old LMCache key that LMCache 0.5.6 ignores too: {IGNORED_OLD_KEYS[key]})"
            if key in IGNORED_OLD_KEYS else "")


_OLD_ENV_PREFIX = re.compile(r"LM_CACHE_(\w+)")


def _old_env_prefix(name: str) -> str | None:
    """For ``LM_CACHE_<X>`` (an old prefix, read by neither LMCache 0.5.6 nor lmcache): the
    variable meant, ``LMCACHE_<X>`` when X is a config key, else ""; None for other names."""
    match = _OLD_ENV_PREFIX.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return None
    key = match.group(1).lower()
    return f"{ENV_PREFIX}{match.group(1)}" if ALIASES.get(key, key) in KNOWN_KEYS else ""


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
        return SUPPORTED[key][0](value)
    except ValueError as e:
        raise ValueError(f"LMCache config key {key}={value!r} (from {source}): {e}") from None


def _check_unsupported(key: str, value: Any, source: str) -> None:
    """A feature switch must be false, any other unsupported key at LMCache's default."""
    try:
        if key in FEATURES:
            if v.lmcache_boolean(value):
                raise ValueError(
                    f"{FEATURES[key]} is not available in lmcache yet; remove the key or set "
                    "it to false")
            return
        default, feature = UNSUPPORTED[key]
        parsed = v.lmcache_boolean(value) if isinstance(default, bool) else v.like(default, value)
        if parsed != default:
            what = (f"it configures {feature}, which is not supported by lmcache yet"
                    if feature else "this LMCache setting is not supported by lmcache")
            raise ValueError(f"{what}; remove it or set it to its default {default!r}")
    except ValueError as e:
        raise ValueError(f"LMCache config key {key}={value!r} (from {source}): {e}") from None


def _option(group: str, name: str, key: str, value: Any, source: str) -> str:
    available = list_options(group)
    if name not in available:
        raise ValueError(
            f"LMCache config key {key}={value!r} (from {source}) needs the {group} option "
            f"{name!r}, which is not installed; available: {', '.join(available) or 'none'}")
    return name


def _translate(values: dict[str, Any], sources: dict[str, str]) -> list[tuple[str, str]]:
    def src(k: str) -> str:
        return sources.get(k, "LMCache's default")

    def get(k: str) -> Any:
        return values.get(k, SUPPORTED[k][1])

    groups: list[tuple[str, str]] = []
    settings: list[tuple[str, str]] = []

    tiers, tier_keys = ["local_cpu"], []
    local_disk = get("local_disk")
    if local_disk is not None:
        tiers.append(_option("storage/backends", "local_disk", "local_disk", local_disk,
                             src("local_disk")))
        tier_keys.append("local_disk")
        if get("max_local_disk_size") <= 0:
            raise ValueError(
                f"LMCache config key local_disk={local_disk!r} (from {src('local_disk')}) needs "
                f"max_local_disk_size > 0 GB, got {get('max_local_disk_size')!r} "
                f"(from {src('max_local_disk_size')})")
        settings.append((f"++local_disk={v.override_value(local_disk)}", src("local_disk")))
    remote_url = get("remote_url")
    if remote_url is not None:
        try:
            option = remote_connector_for(remote_url)
        except ValueError as e:
            raise ValueError(f"LMCache config key remote_url={redact(remote_url)!r} (from "
                             f"{src('remote_url')}): {e}") from None
        tiers.append(_option("storage/backends", "remote", "remote_url", remote_url,
                             src("remote_url")))
        tier_keys.append("remote_url")
        connector = _option("remote_connector", option, "remote_url", remote_url,
                            src("remote_url"))
        groups.append((f"remote_connector={connector}", src("remote_url")))
        settings.append((f"++remote_url={v.override_value(remote_url)}", src("remote_url")))
    if tiers != ["local_cpu"]:
        groups.insert(0, (f"storage/backends=[{','.join(tiers)}]",
                          "; ".join(dict.fromkeys(src(k) for k in tier_keys))))
    if not get("local_cpu"):
        if tiers == ["local_cpu"]:
            logger.warning("LMCache config key local_cpu=False (from %s) and no other tier "
                           "(local_disk, remote_url): nothing will be cached", src("local_cpu"))
        else:
            logger.info("local_cpu=False (from %s): CPU memory (max_local_cpu_size) only "
                        "stages chunks for %s, it caches nothing", src("local_cpu"),
                        ", ".join(tiers[1:]))
        settings.append(("++local_cpu=false", src("local_cpu")))

    if values.get("remote_serde") is not None:
        serde = values["remote_serde"]
        groups.append(("serde=" + _option("serde", serde, "remote_serde", serde,
                                          src("remote_serde")), src("remote_serde")))
    if "cache_policy" in values:
        policy = values["cache_policy"]
        groups.append(("storage/policy=" + _option("storage/policy", policy.lower(),
                                                   "cache_policy", policy, src("cache_policy")),
                       src("cache_policy")))
    if get("use_layerwise"):
        groups.append(("gpu_connector=" + _option("gpu_connector", "vllm_layerwise",
                                                  "use_layerwise", True, src("use_layerwise")),
                       src("use_layerwise")))
    if "pre_caching_hash_algorithm" in values:
        algo = values["pre_caching_hash_algorithm"]
        if algo not in HASH_ALGORITHMS:
            raise ValueError(
                f"LMCache config key pre_caching_hash_algorithm={algo!r} (from "
                f"{src('pre_caching_hash_algorithm')}): expected one of {', '.join(HASH_ALGORITHMS)}")
        settings.append((f"++hash_algorithm={algo}", src("pre_caching_hash_algorithm")))
    if get("enable_async_loading"):
        logger.info("enable_async_loading=True (from %s): lmcache always fetches the chunks of "
                    "slower tiers in the background from lookup time on; retrieve waits only for "
                    "those it needs", src("enable_async_loading"))

    for key in ("chunk_size", "max_local_cpu_size", "max_local_disk_size", "save_unfull_chunk",
                "save_decode_cache", "blocking_timeout_secs", "lookup_timeout_ms",
                "extra_config"):
        if key in values:
            try:
                settings.append((f"++{key}={v.override_value(values[key])}", src(key)))
            except ValueError as e:
                raise ValueError(f"LMCache config key {key}={values[key]!r} (from "
                                 f"{src(key)}): {e}") from None
    return groups + settings
