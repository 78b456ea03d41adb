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
from collections.abc import Mapping
from typing import Any

from lmcache.config import values as v
from lmcache.config.compose import list_options
from lmcache.config.legacy_sources import (ENV_PREFIX, EXTRA_CONFIG_PREFIX, NON_CONFIG_ENV,
                                           is_other_tools_variable, misspelled_prefix,
                                           old_env_prefix, old_key_hint, read_yaml)
from lmcache.config.legacy_p2p import p2p_tier_position, translate_controller
from lmcache.config.legacy_pd import translate_pd
from lmcache.config.lmcache_keys import (ALIASES, FEATURES, HASH_ALGORITHMS, IGNORED_OLD_KEYS,
                                         KNOWN_KEYS, SUPPORTED, UNSUPPORTED, UNSUPPORTED_DEFAULTS)
from lmcache.config.overrides import override_value
from lmcache.config.remote_url import REMOTE_SCHEMES, redact, remote_connector_for

__all__ = ["ALIASES", "FEATURES", "HASH_ALGORITHMS", "IGNORED_OLD_KEYS", "KNOWN_KEYS",
           "REMOTE_SCHEMES", "SUPPORTED", "UNSUPPORTED", "UNSUPPORTED_DEFAULTS",
           "legacy_overrides", "overrides_from_legacy"]

logger = logging.getLogger(__name__)

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
        for key, value in read_yaml(yaml_path, source).items():
            _collect(raw, str(key), value, source)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and name not in NON_CONFIG_ENV:
            key = name[len(ENV_PREFIX):].lower()
            if key in IGNORED_OLD_KEYS or is_other_tools_variable(ALIASES.get(key, key)):
                logger.warning("ignoring environment variable %s: not an LMCache config key%s",
                               name, old_key_hint(key))
                continue
            source = f"environment variable {name}"
            _collect(raw, key, v.unquote(value) if isinstance(value, str) else value, source)
        elif (meant := old_env_prefix(name)) is not None:
            logger.warning("ignoring environment variable %s: lmcache, like LMCache, reads "
                           "LMCACHE_<KEY> variables%s", name,
                           f"; did you mean {meant}?" if meant else "")
    for name, value in (extra_config or {}).items():
        if isinstance(name, str) and name.startswith(EXTRA_CONFIG_PREFIX):
            source = f"kv_connector_extra_config[{name!r}]"
            _collect(raw, name[len(EXTRA_CONFIG_PREFIX):], value, source)
        elif (meant := misspelled_prefix(name)) is not None:
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
    if "pre_caching_hash_algorithm" not in values and any(
            not s.startswith("kv_connector_extra_config") for _, s in raw.values()):
        logger.info("LMCache config without pre_caching_hash_algorithm: lmcache hashes chunks with "
                    "sha256_cbor (vLLM's default); LMCache's default differs (builtin), so set "
                    "pre_caching_hash_algorithm on both to share one store")
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
        settings.append((f"++local_disk={override_value(local_disk)}", src("local_disk")))
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
        settings.append((f"++remote_url={override_value(remote_url)}", src("remote_url")))
    if get("enable_p2p"):
        tiers.insert(p2p_tier_position(tiers), "p2p")
        tier_keys.append("enable_p2p")
    if tiers != ["local_cpu"]:
        groups.insert(0, (f"storage/backends=[{','.join(tiers)}]",
                          "; ".join(dict.fromkeys(src(k) for k in tier_keys))))
    if get("enable_pd"):
        if tiers != ["local_cpu"]:
            raise ValueError(f"LMCache config key enable_pd=True (from {src('enable_pd')}) "
                             f"cannot be combined with {', '.join(tier_keys)}: the pd tier "
                             "comes alone (its buffer is the allocator)")
        groups.extend(translate_pd(values, src, _option))
    ctl_groups, ctl_settings = translate_controller(values, get, src, _option)
    groups.extend(ctl_groups)
    settings.extend(ctl_settings)
    if not get("local_cpu") and not get("enable_pd"):
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
    if get("enable_blending"):
        # the blend option brings its own layerwise connector (vllm_buffer_layerwise) and the
        # segment token database; LMCache's use_layerwise is implied
        groups.append(("blend=" + _option("blend", "cacheblend", "enable_blending", True,
                                          src("enable_blending")), src("enable_blending")))
        for key, path in (("blend_recompute_ratios", "blend.blend_recompute_ratios"),
                          ("blend_check_layers", "blend.blend_check_layers"),
                          ("blend_min_tokens", "blend.blend_min_tokens"),
                          ("blend_special_str", "token_database.blend_special_str")):
            if values.get(key) is not None:
                settings.append((f"++{path}={override_value(values[key])}", src(key)))
    elif any(k in values for k in ("blend_recompute_ratios", "blend_check_layers",
                                   "blend_min_tokens")):
        logger.info("blend_* keys without enable_blending=True (from %s) are ignored, as in "
                    "LMCache", ", ".join(src(k) for k in values if k.startswith("blend_")))
    elif get("use_layerwise"):
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
                "internal_api_server_enabled", "internal_api_server_host",
                "internal_api_server_port_start", "extra_config"):
        if key in values:
            try:
                settings.append((f"++{key}={override_value(values[key])}", src(key)))
            except ValueError as e:
                raise ValueError(f"LMCache config key {key}={values[key]!r} (from "
                                 f"{src(key)}): {e}") from None
    return groups + settings
