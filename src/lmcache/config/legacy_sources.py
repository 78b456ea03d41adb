"""Where LMCache's configuration comes from: its YAML file, the environment and vLLM's
``kv_connector_extra_config``, and the names in them that are not lmcache's (another tool's
``LMCACHE_*`` variable, the old ``LM_CACHE_`` prefix, a misspelled ``lmcache.`` prefix).
Used by :mod:`lmcache.config.legacy`.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any

import yaml

from lmcache.config.lmcache_keys import ALIASES, IGNORED_OLD_KEYS, KNOWN_KEYS

EXTRA_CONFIG_PREFIX = "lmcache."
ENV_PREFIX = "LMCACHE_"
# LMCACHE_* variables that are not configuration keys (read elsewhere, or by LMCache tools).
NON_CONFIG_ENV = frozenset({
    "LMCACHE_CONFIG_FILE", "LMCACHE_LOG_LEVEL", "LMCACHE_LOGGING_LEVEL", "LMCACHE_TRACK_USAGE",
    "LMCACHE_TINY_MODEL_DIR", "LMCACHE_IPC_DIR", "LMCACHE_TEST_CACHE",
})


def old_key_hint(key: str) -> str:
    """The warning's hint for a key LMCache 0.5.6 ignores (empty for other keys)."""
    return (f" (an old LMCache key that LMCache 0.5.6 ignores too: {IGNORED_OLD_KEYS[key]})"
            if key in IGNORED_OLD_KEYS else "")


_OLD_ENV_PREFIX = re.compile(r"LM_CACHE_(\w+)")


def old_env_prefix(name: str) -> str | None:
    """For ``LM_CACHE_<X>`` (an old prefix, read by neither LMCache 0.5.6 nor lmcache): the
    variable meant, ``LMCACHE_<X>`` when X is a config key, else ""; None for other names."""
    match = _OLD_ENV_PREFIX.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return None
    key = match.group(1).lower()
    return f"{ENV_PREFIX}{match.group(1)}" if ALIASES.get(key, key) in KNOWN_KEYS else ""


def read_yaml(path: str | os.PathLike, named: str) -> dict[str, Any]:
    """The mapping in an LMCache YAML file ({} when empty); errors name it as ``named``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{named}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{named} is a directory, expected an LMCache YAML file")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{named} is not valid YAML: {e}") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{named} is not UTF-8 text ({e.reason} at byte {e.start}), "
                             "expected an LMCache YAML file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{named} must hold a mapping of keys to values, got "
                         f"{type(data).__name__}")
    return data


_PREFIXED = re.compile(r"([A-Za-z]+)([._:\-])(.+)")


def misspelled_prefix(name: Any) -> str | None:
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


def is_other_tools_variable(key: str) -> bool:
    """The environment is shared: an LMCACHE_* name far from every config key belongs to
    something else (e.g. LMCACHE_IPC_DIR); a near miss (LMCACHE_CHUNKSIZE) is a typo."""
    return key not in KNOWN_KEYS and not difflib.get_close_matches(
        key, KNOWN_KEYS, n=1, cutoff=0.8)
